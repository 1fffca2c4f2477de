"""Hygiene of the stage scripts (the seven runs and the optional Flying-Chairs one): syntax, no
absolute paths, dry runs, missing inputs."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXP = REPO / "exp"
# script → (run dir under $SFC_OUT/$SOURCE, stage, seed, sfc weight, {flag: input run dir})
SCRIPTS = {
    "FlowNet_chairs/script/train.sh": ("FlowNet_chairs/train", "flownet", "0", None, {}),
    "FlowNet_pretrain/stage_one/script/update.sh":
        ("FlowNet_pretrain/stage_one/update", "segnet", "0", "0", {}),
    "FlowNet_pretrain/stage_one/script/reference.sh":
        ("FlowNet_pretrain/stage_one/reference", "segnet", "1", "0", {}),
    "FlowNet_pretrain/stage_two/script/train.sh":
        ("FlowNet_pretrain/stage_two/train", "accel", "0", "0",
         {"--update-ckpt": "FlowNet_pretrain/stage_one/update",
          "--reference-ckpt": "FlowNet_pretrain/stage_one/reference"}),
    "SFM/script/train.sh":
        ("SFM/train", "sfm", "0", None, {"--flownet-ckpt": "FlowNet_pretrain/stage_two/train"}),
    "SFC/stage_one/script/update.sh":
        ("SFC/stage_one/update", "segnet", "0", "0.005",
         {"--flownet-ckpt": "FlowNet_pretrain/stage_two/train", "--sfm-ckpt": "SFM/train"}),
    "SFC/stage_one/script/reference.sh":
        ("SFC/stage_one/reference", "segnet", "1", "0.005",
         {"--flownet-ckpt": "FlowNet_pretrain/stage_two/train", "--sfm-ckpt": "SFM/train"}),
    "SFC/stage_two/script/train.sh":
        ("SFC/stage_two/train", "accel", "0", "0.001",
         {"--update-ckpt": "SFC/stage_one/update", "--reference-ckpt": "SFC/stage_one/reference",
          "--flownet-ckpt": "FlowNet_pretrain/stage_two/train", "--sfm-ckpt": "SFM/train"}),
}
ITERS = {"FlowNet_chairs": "300000", "FlowNet_pretrain/stage_one": "80000",
         "FlowNet_pretrain/stage_two": "80000", "SFM": "80000", "SFC/stage_one": "120000",
         "SFC/stage_two": "160000"}


def _run(script, tmp_path, *args, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("LAUNCH", "SOURCE", "DRY_RUN")}
    e.update(SFC_OUT=str(tmp_path / "out"), SFC_DATA=str(tmp_path / "data"),
             SFC_WEIGHTS=str(tmp_path / "weights"), **env)
    return subprocess.run(["bash", str(EXP / script), *args], capture_output=True, text=True,
                          env=e, timeout=60)


def _command(proc) -> list[str]:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return shlex.split(lines[0][2:])


def _value(cmd, flag):
    """The last value given to `flag` (later flags win)."""
    idx = [i for i, a in enumerate(cmd) if a == flag]
    assert idx, f"{flag} missing from {cmd}"
    return cmd[idx[-1] + 1]


def test_all_stage_scripts_exist_and_parse():
    found = sorted(str(p.relative_to(EXP)) for p in EXP.rglob("script/*.sh"))
    assert found == sorted(SCRIPTS)
    for s in [*SCRIPTS, "common.sh"]:
        text = (EXP / s).read_text()
        subprocess.run(["bash", "-n", str(EXP / s)], check=True)
        if s != "common.sh":
            assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
            assert '"$@"' in text


def test_no_absolute_paths():
    bad = re.compile(r"""(^|[\s"'=:(])/(home|work|root|tmp|mnt|data|opt|usr|srv|scratch)\b""")
    for p in EXP.rglob("*.sh"):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if n == 1 and line.startswith("#!/usr/bin/env"):
                continue
            assert not bad.search(line), f"{p}:{n}: {line}"


@pytest.mark.parametrize("source", ["viper", "synthia_seq"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_dry_run_names_stage_inputs_outputs(script, source, tmp_path):
    run, stage, seed, weight, needs = SCRIPTS[script]
    proc = _run(script, tmp_path, "--iters", "7", DRY_RUN="1", SOURCE=source)
    assert proc.returncode == 0, proc.stderr
    cmd = _command(proc)
    assert cmd[1:3] == ["-m", "sfc.train"]
    out = tmp_path / "out" / source
    assert _value(cmd, "--stage") == stage
    assert _value(cmd, "--out") == str(out / run)
    assert _value(cmd, "--source") == source
    assert _value(cmd, "--data") == str(tmp_path / "data")
    assert _value(cmd, "--seed") == seed
    assert _value(cmd, "--iters") == "7" and cmd[-2:] == ["--iters", "7"]  # "$@" wins
    assert ITERS[script.rsplit("/script/", 1)[0]] in cmd
    if weight is not None:
        assert _value(cmd, "--sfc-weight") == weight
    for flag, dep in needs.items():
        assert _value(cmd, flag) == str(out / dep)
    if needs:  # nothing produced yet: the dry run says so
        assert "note (dry run): missing" in proc.stderr
    if stage == "segnet":
        assert "DeepLab_resnet_pretrained" in _value(cmd, "--imagenet-init")
    if stage == "accel":
        assert _value(cmd, "--chairs-init").endswith("flownet_flyingchairs_pretrained.pth")
        assert _value(cmd, "--warmup-order") == ("before" if weight != "0" else "after")
    if stage == "sfm":
        assert (_value(cmd, "--lr"), _value(cmd, "--weight-decay")) == ("1e-4", "4e-4")
        assert _value(cmd, "--eval-every") == "4000"
    if stage == "flownet":  # the common FlowNet recipe; no Flying Chairs here: said so
        assert (_value(cmd, "--lr"), _value(cmd, "--batch-size")) == ("1e-4", "8")
        assert "note (dry run): missing" in proc.stderr and "--flying-chairs" in proc.stderr


def test_accel_scripts_take_a_finished_flying_chairs_run(tmp_path):
    """Without the release's file in $SFC_WEIGHTS, the Accel scripts take a finished run of
    exp/FlowNet_chairs/script/train.sh; the file wins when both exist."""
    chairs = tmp_path / "out" / "viper" / "FlowNet_chairs" / "train"
    chairs.mkdir(parents=True)
    (chairs / "result.json").write_text("{}")
    cmd = _command(_run("FlowNet_pretrain/stage_two/script/train.sh", tmp_path, DRY_RUN="1"))
    assert _value(cmd, "--chairs-init") == str(chairs)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "flownet_flyingchairs_pretrained.pth").write_bytes(b"x")
    cmd = _command(_run("FlowNet_pretrain/stage_two/script/train.sh", tmp_path, DRY_RUN="1"))
    assert _value(cmd, "--chairs-init").endswith("weights/flownet_flyingchairs_pretrained.pth")


def test_launch_switches_to_torchrun(tmp_path):
    proc = _run("SFC/stage_two/script/train.sh", tmp_path, DRY_RUN="1",
                LAUNCH="torchrun --nproc_per_node=4")
    cmd = _command(proc)
    assert cmd[:4] == ["torchrun", "--nproc_per_node=4", "-m", "sfc.train"]


def test_python_default_is_the_repo_venv(tmp_path):
    cmd = _command(_run("SFM/script/train.sh", tmp_path, DRY_RUN="1"))
    venv = REPO / ".venv" / "bin" / "python"
    assert cmd[0] == (str(venv) if venv.exists() else "python3")
    cmd = _command(_run("SFM/script/train.sh", tmp_path, DRY_RUN="1", PYTHON="mypython"))
    assert cmd[0] == "mypython"


@pytest.mark.parametrize("script,producer", [
    ("FlowNet_pretrain/stage_two/script/train.sh", "FlowNet_pretrain/stage_one/script/update.sh"),
    ("SFM/script/train.sh", "FlowNet_pretrain/stage_two/script/train.sh"),
    ("SFC/stage_one/script/update.sh", "FlowNet_pretrain/stage_two/script/train.sh"),
    ("SFC/stage_two/script/train.sh", "SFC/stage_one/script/update.sh"),
])
def test_missing_earlier_output_names_its_script(script, producer, tmp_path):
    proc = _run(script, tmp_path, "--imagenet-init", "none", "--chairs-init", "none")
    assert proc.returncode != 0
    assert producer in proc.stderr and "best.pt" in proc.stderr
    assert "+ " not in proc.stdout  # nothing launched


def test_missing_pretrained_weights_say_where_to_get_them(tmp_path):
    proc = _run("FlowNet_pretrain/stage_one/script/update.sh", tmp_path)
    assert proc.returncode != 0
    assert "DeepLab_resnet_pretrained_init-f81d91e8.pth" in proc.stderr
    assert "--imagenet-init none" in proc.stderr
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "DeepLab_resnet_pretrained_imagenet.pth").write_bytes(b"x")  # ADVENT's name
    cmd = _command(_run("FlowNet_pretrain/stage_one/script/update.sh", tmp_path, DRY_RUN="1"))
    assert _value(cmd, "--imagenet-init") == str(weights / "DeepLab_resnet_pretrained_imagenet.pth")


def test_bad_source_is_an_error(tmp_path):
    proc = _run("SFM/script/train.sh", tmp_path, DRY_RUN="1", SOURCE="gta")
    assert proc.returncode != 0 and "SOURCE must be viper or synthia_seq" in proc.stderr


def _fake_bin(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
    (folder / name).chmod(0o755)


@pytest.mark.parametrize("rc,requeued", [(138, True), (143, True), (0, False), (2, False),
                                         (3, False), (4, False), (5, False)])
def test_slurm_recipe_requeues_only_a_signalled_stop(rc, requeued, tmp_path):
    """exp/slurm/job.sbatch with a fake srun and scontrol: the stage's exit status (138 / 143:
    stopped by the time-limit signal, last.pt saved) queues the next attempt; any other status
    ends the job with that status."""
    bin_ = tmp_path / "bin"
    _fake_bin(bin_, "srun", 'exec "$@"')
    _fake_bin(bin_, "scontrol", f'echo "$@" >> {shlex.quote(str(tmp_path / "calls"))}')
    stage = tmp_path / "stage.sh"
    stage.write_text(f"exit {rc}\n")
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=str(REPO))
    res = subprocess.run(["bash", str(REPO / "exp/slurm/job.sbatch"), str(stage)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == rc
    calls = (tmp_path / "calls").read_text() if (tmp_path / "calls").exists() else ""
    assert calls == ("requeue 4242\n" if requeued else "")


def test_stage_scripts_pass_the_runs_exit_status_through_a_launcher(tmp_path):
    """A launcher that exits 1 whatever its worker did (as torchrun): the stage script exits
    with the status sfc.train wrote to $SFC_STATUS_FILE — 2 for a bad flag here."""
    launcher = tmp_path / "launch.sh"
    launcher.write_text('"$@"; exit 1\n')
    import sys

    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, LAUNCH=f"bash {launcher} {sys.executable}", TMPDIR=str(tmp_path / "tmp"),
               SFC_OUT=str(tmp_path / "out"), SFC_DATA=str(tmp_path / "data"))
    res = subprocess.run(["bash", str(REPO / "exp/FlowNet_pretrain/stage_one/script/update.sh"),
                          "--imagenet-init", "none", "--iters", "0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "sfc.train: error: --iters" in res.stderr
    assert not list((tmp_path / "tmp").glob("sfc-status.*"))  # the status file is removed
