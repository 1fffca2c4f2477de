"""The package's floor plan (docs/architecture.md) and its packaging (pyproject.toml).

Import rules, checked on every module's source (imports inside functions included):
* models, losses and data import nothing from training, evaluation, the demo or the benchmark;
* evaluation imports nothing from training;
* nothing imports the demo or the benchmark except themselves.
"""

import ast
import importlib
import pkgutil
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import sfc

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
REPO = Path(__file__).resolve().parent.parent
UPPER = ("sfc.train", "sfc.evaluate", "sfc.predict", "sfc.demo", "sfc.bench")
RULES = [  # (importing part, parts it must not import)
    ("sfc.models", UPPER + ("sfc.data", "sfc.losses")),
    ("sfc.losses", UPPER + ("sfc.data",)),
    ("sfc.data", UPPER + ("sfc.models", "sfc.losses")),
    ("sfc.checkpoints", UPPER),
    ("sfc.dist", UPPER),
    ("sfc.vis", UPPER),
    ("sfc.flags", UPPER),
    ("sfc.evaluate", ("sfc.train", "sfc.predict", "sfc.demo", "sfc.bench")),
    ("sfc.train", ("sfc.predict", "sfc.demo", "sfc.bench")),
    ("sfc.predict", ("sfc.train", "sfc.demo", "sfc.bench")),
]


def _within(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every `sfc...` module that `source` (the code of `module`) imports, relative imports
    resolved; `from X import y` counts X and X.y (y may be a submodule)."""
    pkg = module if is_package else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if _within(m, "sfc")}


def violations(mod_imports: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, imps in sorted(mod_imports.items()):
        for part, forbidden in RULES:
            if _within(mod, part):
                bad += [f"{mod} imports {i}" for i in sorted(imps)
                        if any(_within(i, f) for f in forbidden)]
        for closed in ("sfc.demo", "sfc.bench", "sfc.predict"):
            if not _within(mod, closed):
                bad += [f"{mod} imports {i}" for i in sorted(imps) if _within(i, closed)]
    return bad


def _package_imports() -> dict[str, set[str]]:
    found = {}
    for info in pkgutil.walk_packages(sfc.__path__, "sfc."):
        spec = importlib.util.find_spec(info.name)
        src = Path(spec.origin).read_text()
        found[info.name] = imported_modules(src, info.name, info.ispkg)
    return found


def test_import_rules_hold():
    mods = _package_imports()
    assert {"sfc.train.engine", "sfc.evaluate.core", "sfc.demo.runner", "sfc.bench.reference",
            "sfc.data.synthetic.writer", "sfc.models.accel"} <= set(mods)
    assert violations(mods) == []


def test_import_rule_checker_catches_violations():
    src = ("from sfc.train import stages\nimport sfc.bench.steps\n\n"
           "def f():\n    from ..demo import x\n")
    imps = imported_modules(src, "sfc.data.io", is_package=False)
    assert {"sfc.train", "sfc.train.stages", "sfc.bench.steps", "sfc.demo", "sfc.demo.x"} <= imps
    bad = violations({"sfc.data.io": imps})
    assert "sfc.data.io imports sfc.train.stages" in bad
    assert "sfc.data.io imports sfc.bench.steps" in bad
    assert "sfc.data.io imports sfc.demo.x" in bad
    assert violations({"sfc.evaluate.core": {"sfc.train.runio"}}) == [
        "sfc.evaluate.core imports sfc.train.runio"]
    assert violations({"sfc.demo.runner": {"sfc.train", "sfc.evaluate.cli"}}) == []


def test_top_level_is_parts_and_shared_modules_only():
    top = sorted(p.name for p in (REPO / "sfc").iterdir()
                 if p.name != "__pycache__" and not p.name.endswith(".egg-info"))
    assert top == ["__init__.py", "__main__.py", "bench", "checkpoints.py", "data", "demo",
                   "dist.py", "evaluate", "flags.py", "losses.py", "models", "predict", "train",
                   "vis.py"]


def test_public_names_stay_where_the_readme_says():
    from sfc.checkpoints import load_deeplab_init, load_release_accel  # noqa: F401
    from sfc.data import CityscapesSeq, SynthiaSeq, ViperSeq, make_dataset  # noqa: F401
    from sfc.data.synthetic import generate  # noqa: F401
    from sfc.evaluate import evaluate_accel, evaluate_segnet, evaluate_sfm  # noqa: F401
    from sfc.losses import accel_sfc_loss, sfc_loss, sfm_loss  # noqa: F401
    from sfc.models import Accel, DeepLabV2, FlowNetS, warp  # noqa: F401
    from sfc.train import build_parser, main, resolve, train  # noqa: F401


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_pyproject_dependencies_cover_the_pinned_set():
    deps = [Requirement(d) for d in _pyproject()["project"]["dependencies"]]
    pins = _pins(REPO / "requirements.txt")
    assert {d.name.lower() for d in deps} == set(pins) == {
        "torch", "torchvision", "numpy", "pillow", "opencv-python-headless", "tqdm",
        "tensorboard"}
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for d in deps:
        assert str(d.specifier), f"{d.name}: no version range"
        assert d.specifier.contains(pins[d.name.lower()]), (d, pins[d.name.lower()])
    dev = [Requirement(d) for d in _pyproject()["project"]["optional-dependencies"]["dev"]]
    dev_pins = _pins(REPO / "requirements-dev.txt")
    assert {d.name.lower() for d in dev} == set(dev_pins) == {"pytest", "pytest-xdist", "ruff"}
    assert all(d.specifier.contains(dev_pins[d.name.lower()]) for d in dev)
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text()
    assert "-r requirements-flow.txt" in (REPO / "requirements-dev.txt").read_text()
    flow = [Requirement(d) for d in _pyproject()["project"]["optional-dependencies"]["flow"]]
    flow_pins = _pins(REPO / "requirements-flow.txt")
    assert {d.name.lower() for d in flow} == set(flow_pins) == {"scikit-image"}
    assert all(d.specifier.contains(flow_pins[d.name.lower()]) for d in flow)


SCRIPTS = {"sfc-train": "sfc.train.cli:main", "sfc-evaluate": "sfc.evaluate.cli:main",
           "sfc-demo": "sfc.demo.runner:main", "sfc-bench": "sfc.bench.cli:main",
           "sfc-predict": "sfc.predict.cli:main"}


def test_console_scripts_point_at_the_commands():
    scripts = _pyproject()["project"]["scripts"]
    assert {k: v for k, v in scripts.items() if k in SCRIPTS} == SCRIPTS
    for target in scripts.values():
        mod, func = target.split(":")
        assert callable(getattr(importlib.import_module(mod), func))


@pytest.mark.parametrize("name,prog", [("sfc-train", "python -m sfc.train"),
                                       ("sfc-evaluate", "python -m sfc.evaluate")])
def test_installed_console_scripts_print_help(name, prog):
    exe = Path(sys.executable).parent / name
    if not exe.is_file():
        pytest.skip(f"{name} not installed next to {sys.executable} (pip install -e . does it)")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(rf"usage: {re.escape(prog)}", out.stdout)
    assert "--checkpoint" in out.stdout if name == "sfc-evaluate" else "--stage" in out.stdout


@pytest.mark.parametrize("module", ["sfc.train", "sfc.evaluate", "sfc.demo", "sfc.bench",
                                    "sfc.predict",
                                    "sfc.data.check", "sfc.data.synthetic", "sfc.demo.gap"])
def test_python_dash_m_commands_keep_their_names(module, monkeypatch, capsys):
    # what `python -m MODULE --help` runs, in this process (runpy is how -m runs a module)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    monkeypatch.delitem(sys.modules, module, raising=False)  # run it afresh, as -m does
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None)
    assert capsys.readouterr().out.startswith("usage: ")


def test_python_m_sfc_lists_every_command():
    import importlib.util
    import subprocess
    import sys

    from sfc.__main__ import COMMANDS

    out = subprocess.run([sys.executable, "-m", "sfc"], capture_output=True, text=True,
                         check=True).stdout
    scripts = _pyproject()["project"]["scripts"]
    for cmd, script, _ in COMMANDS:
        mod = cmd.split()[-1]
        assert cmd in out and importlib.util.find_spec(mod) is not None, mod
        if script:
            assert script in scripts and scripts[script].startswith(mod)
    assert set(scripts) <= {s for _, s, _ in COMMANDS}


def test_no_text_points_outside_the_repository():
    """The method doc lives in the repository (docs/method.md): nothing cites a SPEC file or a
    shared folder the users do not have."""
    import re

    bad = re.compile(r"SPEC(\.md| ?§| \d)|\.\./shared|shared/SPEC")
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".sh", ".toml", ".txt")
             and ".venv" not in p.parts and "save_results" not in p.parts
             and "data" not in p.parts[len(REPO.parts):len(REPO.parts) + 1]]
    hits = [f"{p.relative_to(REPO)}:{n}" for p in files
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if bad.search(line) and p.name != "test_layout.py"]
    assert not hits, hits
    assert (REPO / "docs" / "method.md").is_file()
