# The two commands of the README: `make demo` and `make test`.
# Both create .venv on first use (torch/torchvision are pinned in requirements.txt).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sfc-installed

.PHONY: demo test lint venv bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sfc.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check sfc tests

bench: $(STAMP)
	$(PY) -m sfc.bench $(ARGS)

clean-demo:
	rm -rf save_results/demo save_results/demo_synthia_seq
