# The two commands of the README: `make demo` and `make test`.
# Both create .venv on first use (torch/torchvision are pinned in requirements.txt) and add the
# optional flow extra (requirements-flow.txt); `make test` also installs the test tools of
# requirements-dev.txt into the same .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# byte-compiled at install (pip's default): with PYTHONDONTWRITEBYTECODE set, as on the
# project's machines, `--no-compile` made every test process recompile torch (measured
# 2026-12-04: the suite 359 s instead of 234 s)
PIP    := $(PY) -m pip install -q --disable-pip-version-check
STAMP  := $(VENV)/.sfc-installed
DEV    := $(VENV)/.sfc-dev-installed
FLOW   := $(VENV)/.sfc-flow-installed
# pytest workers: 3 on the project's 2-core machines — much of the suite waits on subprocess
# start-ups, so a third worker fills the cores (override: make test JOBS=1)
JOBS   ?= 3

.PHONY: demo test lint venv bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps --no-build-isolation -e .
	@touch $(STAMP)

$(DEV): $(STAMP) requirements-dev.txt requirements-flow.txt
	$(PIP) -r requirements-dev.txt
	@touch $(DEV) $(FLOW)

# the optional "flow" extra (scikit-image: a real image pair with ground truth for the demo)
$(FLOW): $(STAMP) requirements-flow.txt
	$(PIP) -r requirements-flow.txt
	@touch $(FLOW)

demo: $(STAMP) $(FLOW)
	$(PY) -m sfc.demo $(ARGS)

test: $(DEV)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile $(ARGS)

lint: $(DEV)
	$(PY) -m ruff check sfc tests

bench: $(STAMP)
	$(PY) -m sfc.bench $(ARGS)

clean-demo:
	rm -rf save_results/demo save_results/demo_synthia_seq
