"""Long runs on a real cluster (issue 11): signals to the process group, divergence, wrong
inputs between stages, resumes into another configuration, two processes on one run
directory, leftovers of killed runs, data errors inside loader workers."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

from sfc import train
from sfc.train import runio

REPO = Path(__file__).resolve().parent.parent


def _segnet(data, out, *extra):
    return train.main(["--stage", "segnet", "--data", str(data), "--out", str(out),
                       *TINY_TRAIN, "--imagenet-init", "none", *extra])


def _accel(data, out, runs, *extra):
    return train.main(["--stage", "accel", "--data", str(data), "--out", str(out), *TINY_TRAIN,
                       "--chairs-init", "none", "--update-ckpt", str(runs["segnet"]),
                       "--reference-ckpt", str(runs["segnet"]), *extra])


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("sfc.train: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ---- 1. signals ----------------------------------------------------------------------------
def _start(data, out, *extra):
    cmd = [sys.executable, "-m", "sfc.train", "--stage", "segnet", "--data", str(data),
           "--out", str(out), *TINY_TRAIN, "--imagenet-init", "none", "--iters", "100000",
           "--eval-every", "100000", *extra]
    # a new process group (as a batch job has), default handlers even under `nohup`/`&`
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_iterations(out: Path, n: int, proc, timeout=120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = out / "metrics.jsonl"
        if m.is_file() and sum('"train"' in x for x in m.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training did not start")


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, True), (signal.SIGUSR1, False),
                                       (signal.SIGINT, True)])
def test_job_signals_save_last_pt_with_loader_workers(sig, group, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = _start(tiny_data, out, "--num-workers", "2")
    _wait_for_iterations(out, 3, proc)
    if group:  # what scancel / a time limit does: every process of the job, workers included
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stdout[-2000:] + stderr[-2000:]
    assert "killed by signal" not in stderr and "Traceback" not in stderr
    ck = runio.load_checkpoint(out / "last.pt")
    line = [ln for ln in stdout.splitlines() if "stopped at iteration" in ln]
    assert line and f"stopped at iteration {ck['iter']} ({signal.Signals(sig).name})" in line[0]
    assert "run the same command again to resume" in line[0] and str(out) in line[0]
    assert ck["iter"] >= 3 and not (out / ".lock").exists()  # the lock is released
    # the same command resumes (here told to stop one iteration later)
    rc = _segnet(tiny_data, out, "--iters", "100000", "--eval-every", "100000",
                 "--stop-after", str(ck["iter"] + 1))
    assert rc == 0 and runio.load_checkpoint(out / "last.pt")["iter"] == ck["iter"] + 1


# ---- 2. divergence ---------------------------------------------------------------------------
@pytest.mark.parametrize("lr,term", [("1e6", "non-finite flow at iteration"),
                                     ("1e3", "non-finite parameter")])
def test_accel_divergence_stops_cleanly(lr, term, tiny_data, tiny_runs, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _accel(tiny_data, out, tiny_runs, "--iters", "40", "--eval-every", "40", "--lr", lr,
                "--warmup-iters", "0")
    text = capsys.readouterr().out
    assert rc == 3  # not a segmentation fault (exit 139), not a traceback
    line = [ln for ln in text.splitlines() if "stopping:" in ln]
    assert len(line) == 1 and term in line[0] and "last.pt left untouched" in line[0]
    assert not (out / "last.pt").exists()


@pytest.mark.parametrize("stage", ["segnet", "sfm"])
def test_segnet_and_sfm_divergence_stop_cleanly(stage, tiny_data, tiny_runs, tmp_path, capsys):
    extra = (["--imagenet-init", "none"] if stage == "segnet"
             else ["--flownet-ckpt", str(tiny_runs["accel"])])
    rc = train.main(["--stage", stage, "--data", str(tiny_data), "--out", str(tmp_path / "r"),
                     *TINY_TRAIN, "--iters", "40", "--eval-every", "40", "--lr", "1e12",
                     *extra])
    line = [ln for ln in capsys.readouterr().out.splitlines() if "stopping:" in ln]
    assert rc == 3 and len(line) == 1 and "non-finite" in line[0] and "iteration" in line[0]
    assert not (tmp_path / "r" / "last.pt").exists()


def test_nan_flow_is_caught_before_backward(tiny_data, tiny_runs):
    from sfc.train.stages import NonFiniteLoss, build_stage

    args = train.resolve(train.build_parser().parse_args([
        "--stage", "accel", "--data", str(tiny_data), "--out", "x", *TINY_TRAIN,
        "--chairs-init", "none", "--update-ckpt", str(tiny_runs["segnet"]),
        "--reference-ckpt", str(tiny_runs["segnet"])]))
    stage = build_stage(args, torch.device("cpu"), log=lambda s: None)
    with torch.no_grad():
        stage.nets["accel"].flownet.predict_flow2.bias.fill_(float("nan"))
    clip = torch.rand(1, 3, 2, 32, 64)
    src = {"seg": clip * 255 - 110, "flow": clip, "label": torch.zeros(1, 32, 64).long()}
    with pytest.raises(NonFiniteLoss) as e:
        stage.train_step(src, None)
    assert e.value.what == "flow" and e.value.term == "accel.flownet"
    assert all(p.grad is None for p in stage.trainable_parameters())  # no backward ran


# ---- 3. inputs between stages and resumes --------------------------------------------------
def test_unreadable_inputs_are_one_line(tiny_data, tiny_runs, tmp_path, capsys):
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes((tiny_runs["segnet"] / "best.pt").read_bytes()[:5000])
    jpeg = sorted((tiny_data / "VIPER").rglob("*.jpg"))[0]
    for bad in (trunc, jpeg):
        assert train.main(["--stage", "accel", "--data", str(tiny_data), "--out",
                           str(tmp_path / "r"), *TINY_TRAIN, "--chairs-init", "none",
                           "--update-ckpt", str(bad),
                           "--reference-ckpt", str(tiny_runs["segnet"])]) == 2
        line = _err_line(capsys)
        assert str(bad) in line and "cannot be read" in line and "expected" in line


def test_mismatching_segnet_inputs_name_what_differs(tiny_data, tiny_runs, tmp_path, capsys):
    other = tmp_path / "wide"  # a stage-one run of another width
    assert _segnet(tiny_data, other, "--iters", "1", "--eval-every", "1", "--width", "16") == 0
    syn = tmp_path / "syn"  # a 12-class (SYNTHIA-Seq protocol) SegNet, as a release file
    from sfc.models import DeepLabV2

    torch.save(DeepLabV2(12, multi_level=True, layers=(1, 1, 1, 1), width=8).state_dict(),
               syn.with_suffix(".pth"))
    cases = [(other, "width 16"), (syn.with_suffix(".pth"), "12 classes in the file, 15"),
             (tiny_runs["sfm"], "'sfm' run"), (tiny_runs["accel"], "'accel' run")]
    capsys.readouterr()
    for bad, why in cases:
        assert _accel(tiny_data, tmp_path / "r", {"segnet": bad}) == 2
        line = _err_line(capsys)
        assert why in line and str(bad) in line, line


def test_unfinished_earlier_run_is_refused(tiny_data, tiny_runs, tmp_path, capsys):
    half = tmp_path / "half"
    assert _segnet(tiny_data, half, "--iters", "4", "--eval-every", "1", "--stop-after",
                   "2") == 0
    assert not (half / "result.json").exists()
    capsys.readouterr()
    assert _accel(tiny_data, tmp_path / "r", {"segnet": half}) == 2
    line = _err_line(capsys)
    assert f"{half} has not finished" in line and "iteration 2 of 4" in line
    assert "--allow-unfinished" in line
    # also when the checkpoint file inside it is named
    assert _accel(tiny_data, tmp_path / "r", {"segnet": half / "best.pt"}) == 2
    assert "has not finished" in _err_line(capsys)
    assert _accel(tiny_data, tmp_path / "r2", {"segnet": half}, "--iters", "1",
                  "--eval-every", "1", "--allow-unfinished") == 0


@pytest.mark.parametrize("flags,keys", [
    (["--seed", "5"], ["seed 0 -> 5"]),
    (["--width", "16"], ["width 8 -> 16"]),
    (["--source-size", "64", "48"], ["source_size [64, 32] -> [64, 48]"]),
    (["--optimizer", "clean"], ["optimizer 'release' -> 'clean'"]),
    (["--iters", "9"], ["iters 4 -> 9"]),  # the poly LR of the segnet stage depends on it
    (["--batch-size", "2", "--lr", "1e-3"], ["batch_size 1 -> 2", "lr 0.00025 -> 0.001"]),
])
def test_resume_with_another_trajectory_is_refused(flags, keys, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2", "--stop-after",
                   "2") == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2", *flags) == 2
    line = _err_line(capsys)
    assert f"{out} holds a run with another configuration" in line
    assert all(k in line for k in keys), line
    assert (out / "last.pt").read_bytes() == before
    # eval frequency, workers, device do not change the trajectory: resuming is fine
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "4", "--num-workers",
                   "0") == 0


def test_resume_into_another_stage_or_truncated_last_pt(tiny_data, tiny_runs, tmp_path,
                                                        capsys):
    out = tmp_path / "run"
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2", "--stop-after",
                   "2") == 0
    capsys.readouterr()
    assert _accel(tiny_data, out, tiny_runs) == 2
    assert "belongs to a 'segnet' run, not 'accel'" in _err_line(capsys)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2") == 2
    line = _err_line(capsys)
    assert f"{out / 'last.pt'}: cannot be read" in line and "truncated" in line


# ---- 4. one run directory, one process -----------------------------------------------------
def test_second_process_on_one_run_directory_exits_naming_the_holder(tiny_data, tmp_path,
                                                                    capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                               "since": "2026-12-01 08:00:00"}))
        assert _segnet(tiny_data, out, "--iters", "1", "--eval-every", "1") == 2
        line = _err_line(capsys)
        assert f"in use by pid {holder.pid} on {socket.gethostname()}" in line
        assert not (out / "log.txt").exists()  # nothing written by the second process
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale and taken over
    assert _segnet(tiny_data, out, "--iters", "1", "--eval-every", "1") == 0
    log = (out / "log.txt").read_text()
    assert f"took over the lock of pid {holder.pid}" in log
    assert not (out / ".lock").exists()


def test_lock_from_another_host_is_respected(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "other-node-17",
                                                "since": "x"}))
    with pytest.raises(runio.RunDirError, match="in use by pid 1 on other-node-17"):
        runio.RunLock(tmp_path)
    (tmp_path / ".lock").unlink()
    lock = runio.RunLock(tmp_path)
    with pytest.raises(runio.RunDirError, match=f"pid {os.getpid()}"):
        runio.RunLock(tmp_path)  # a live holder: this very process
    lock.release()
    assert not (tmp_path / ".lock").exists()


# ---- 5. clean state ------------------------------------------------------------------------
def _train_steps(run: Path):
    return [json.loads(x)["iter"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["split"] == "train"]


def test_leftovers_of_a_crash_are_cleaned_on_resume(tiny_data, tmp_path):
    """A run killed after it had logged and written best.pt past its last last.pt."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2", "--stop-after",
                   "2") == 0
    at2 = (out / "last.pt").read_bytes()
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2") == 0  # to the end
    # the crash: last.pt of iteration 2, result.json not yet written, a best.pt of iteration 4,
    # a temp file of a killed writer
    (out / "last.pt").write_bytes(at2)
    (out / "result.json").unlink()
    best = torch.load(out / "best.pt", weights_only=True)
    best["iter"] = 4
    torch.save(best, out / "best.pt")
    (out / ".last.pt.tmp.99999").write_bytes(b"\0" * (3 << 20))
    assert _train_steps(out) == [1, 2, 3, 4]
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2") == 0
    log = (out / "log.txt").read_text()
    assert "removed .last.pt.tmp.99999 (3.0 MiB)" in log
    assert not (out / ".last.pt.tmp.99999").exists()
    assert "is not the best recorded in last.pt" in log and (out / "best.pt.orphaned").is_file()
    assert torch.load(out / "best.pt", weights_only=True)["iter"] in (2, 4)  # rewritten
    assert _train_steps(out) == [1, 2, 3, 4]  # replayed iterations not repeated
    assert "metrics.jsonl cut back to iteration 2" in log
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss_seg")] == [1, 2, 3, 4]


def _corrupt_one_source_clip(root: Path) -> Path:
    from sfc.data import ViperSeq

    seq, f = ViperSeq(root / "VIPER", size=None).items[-1]
    img = root / "VIPER" / "train" / "img" / seq / f"{seq}_{f:05d}.jpg"
    img.write_bytes(img.read_bytes()[:200])  # truncated JPEG
    return img


@pytest.mark.slow
def test_data_error_in_a_worker_is_the_one_line_error(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = _corrupt_one_source_clip(data)
    lines = {}
    for workers in ("0", "2"):
        out = tmp_path / f"run{workers}"
        # a process of its own: it must also exit (not wait for its loader workers forever)
        proc = subprocess.run([sys.executable, "-m", "sfc.train", "--stage", "segnet", "--data",
                               str(data), "--out", str(out), *TINY_TRAIN, "--imagenet-init",
                               "none", "--iters", "40", "--eval-every", "40", "--num-workers",
                               workers], cwd=REPO, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        lines[workers] = [ln for ln in proc.stderr.splitlines()
                          if ln.startswith("sfc.train: error: ")]
        assert len(lines[workers]) == 1 and str(bad) in lines[workers][0]
        assert "Original Traceback" not in proc.stderr
        log = (out / "log.txt").read_text()
        assert "stopping: data error at iteration" in log and str(bad) in log
        ck = runio.load_checkpoint(out / "last.pt")  # saved before stopping
        assert f"last.pt saved at iteration {ck['iter']}" in log
    assert lines["0"] == lines["2"]


# ---- 7. scripts from a path with spaces ----------------------------------------------------
def test_scripts_run_from_a_path_with_spaces(tiny_data, tmp_path):
    repo = tmp_path / "my projects" / "sfc copy"
    repo.mkdir(parents=True)
    shutil.copytree(REPO / "exp", repo / "exp")
    shutil.copytree(REPO / "sfc", repo / "sfc", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".venv" / "bin").mkdir(parents=True)
    py = repo / ".venv" / "bin" / "python"  # the scripts' default PYTHON: a path with spaces
    py.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "LAUNCH", "SOURCE")}
    env.update(SFC_DATA=str(tiny_data), SFC_OUT=str(tmp_path / "out dir"))
    proc = subprocess.run(["bash", str(repo / "exp/FlowNet_pretrain/stage_one/script/update.sh"),
                           *TINY_TRAIN, "--iters", "1", "--eval-every", "1",
                           "--imagenet-init", "none"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "out dir" / "viper" / "FlowNet_pretrain/stage_one/update"
    assert (run / "result.json").is_file()
    assert proc.stdout.startswith("+ " + str(py).replace(" ", "\\ ") + " -m sfc.train")
    env["LAUNCH"] = "torchrun --nproc_per_node=2"  # a launcher prefix still splits into words
    dry = subprocess.run(["bash", str(repo / "exp/SFM/script/train.sh")], env=dict(
        env, DRY_RUN="1"), capture_output=True, text=True, timeout=60)
    assert dry.stdout.startswith("+ torchrun --nproc_per_node=2 -m sfc.train"), dry.stdout


def test_orphaned_best_of_an_older_best_is_reported_lost(tmp_path):
    torch.save({"format": runio.CHECKPOINT_FORMAT, "iter": 6, "models": {}}, tmp_path / "best.pt")
    ckpt = {"iter": 4, "best": {"iter": 2, "value": 0.5}}
    notes = runio.set_aside_orphaned_best(tmp_path, ckpt)
    assert "(iteration 6) is not the best recorded in last.pt (iteration 2)" in notes[0]
    assert "cannot be recovered" in notes[1] and ckpt["best"] == {"iter": None, "value": None}
    assert (tmp_path / "best.pt.orphaned").is_file() and not (tmp_path / "best.pt").exists()
    torch.save({"format": runio.CHECKPOINT_FORMAT, "iter": 2, "models": {}}, tmp_path / "best.pt")
    assert runio.set_aside_orphaned_best(tmp_path, {"iter": 4, "best": {"iter": 2}}) == []


# ---- issue 17: locks that survive a requeue, full disks, damaged records, job logs ----------
def test_lock_of_the_same_job_on_another_host_is_taken_over(tmp_path, monkeypatch):
    """A SLURM requeue lands on another node after a hard kill: the same SLURM_JOB_ID takes the
    lock over; another job's lock is refused with a message naming --force-unlock, which
    takes it."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "node-17",
                                                "job": "SLURM_JOB_ID=4242", "since": "x"}))
    lock = runio.RunLock(tmp_path)
    assert lock.taken_over["host"] == "node-17"
    assert json.loads((tmp_path / ".lock").read_text())["job"] == "SLURM_JOB_ID=4242"
    lock.refresh()
    assert "refreshed" in json.loads((tmp_path / ".lock").read_text())
    lock.release()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "node-17",
                                                "job": "SLURM_JOB_ID=7", "since": "x"}))
    with pytest.raises(runio.RunDirError, match="job SLURM_JOB_ID=7.*--force-unlock"):
        runio.RunLock(tmp_path)
    forced = runio.RunLock(tmp_path, force=True)
    assert forced.taken_over["job"] == "SLURM_JOB_ID=7"
    forced.release()


def test_force_unlock_in_the_cli(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 1, "host": "gone-node", "since": "x"}))
    assert _segnet(tiny_data, out, "--iters", "1", "--eval-every", "1") == 2
    assert "--force-unlock" in _err_line(capsys)
    assert _segnet(tiny_data, out, "--iters", "1", "--eval-every", "1", "--force-unlock") == 0
    assert "took over the lock of pid 1 on gone-node, --force-unlock" in (
        out / "log.txt").read_text()


def _fail_writes_of(monkeypatch, name: str, after: int = 0):
    """torch.save into a temporary file of `name` fails with ENOSPC after `after` writes."""
    import errno

    real, seen = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        target = getattr(f, "name", str(f))
        if f".{name}.tmp." in str(target):
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_at_a_checkpoint_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    """last.pt cannot be written at iteration 4: exit 4, one line naming the folder and the free
    space; last.pt and best.pt stay those of iteration 2 and the log says so."""
    out = tmp_path / "run"
    _fail_writes_of(monkeypatch, "last.pt", after=1)
    assert _segnet(tiny_data, out, "--iters", "6", "--eval-every", "2") == 4
    line = _err_line(capsys)
    assert f"writing {out / 'last.pt'} failed (No space left on device;" in line
    assert f"GiB free in {out})" in line
    assert "last.pt holds iteration 2" in line
    assert runio.load_checkpoint(out / "last.pt")["iter"] == 2
    best = runio.load_checkpoint(out / "best.pt")["iter"]
    assert f"best.pt holds iteration {best}" in line
    st = json.loads((out / "status.json").read_text())
    assert (st["reason"], st["exit_status"], st["last_pt_iteration"]) == ("write_failed", 4, 2)
    assert not list(out.glob(".*.tmp.*"))
    monkeypatch.undo()
    assert _segnet(tiny_data, out, "--iters", "6", "--eval-every", "2") == 0  # resumes


def test_best_counts_only_once_written(tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _fail_writes_of(monkeypatch, "best.pt")
    assert _segnet(tiny_data, out, "--iters", "6", "--eval-every", "2") == 4
    log = (out / "log.txt").read_text()
    assert "iter 2: val miou" in log and "best.pt could not be written" in log
    assert "(best)" not in log
    line = _err_line(capsys)
    assert "best.pt not written yet" in line and not (out / "best.pt").exists()


def test_invalid_config_json_is_rewritten_on_resume(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2", "--stop-after",
                   "2") == 0
    (out / "config.json").write_text('{"config": {"seed": 0,')  # a bad hand edit
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2") == 0
    rec = json.loads((out / "config.json").read_text())
    assert rec["config"]["stage"] == "segnet" and rec["config"]["iters"] == 4
    assert "config.json: not valid JSON" in (out / "log.txt").read_text()


def test_finished_run_needs_no_last_pt(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _segnet(tiny_data, out, "--iters", "2", "--eval-every", "2") == 0
    result = (out / "result.json").read_text()
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[:100])
    capsys.readouterr()
    assert _segnet(tiny_data, out, "--iters", "2", "--eval-every", "2") == 0
    out_text = capsys.readouterr()
    assert "already finished" in out_text.out and "move it away" not in out_text.err
    assert (out / "result.json").read_text() == result
    assert json.loads((out / "status.json").read_text())["reason"] == "finished"


def test_status_json_and_the_status_file(tiny_data, tmp_path, monkeypatch):
    out, status = tmp_path / "run", tmp_path / "status"
    monkeypatch.setenv("SFC_STATUS_FILE", str(status))
    assert _segnet(tiny_data, out, "--iters", "4", "--eval-every", "2", "--stop-after",
                   "2") == 0
    st = json.loads(status.read_text())
    assert st == json.loads((out / "status.json").read_text())
    assert (st["reason"], st["iteration"], st["exit_status"], st["resumable"]) == (
        "stop_after", 2, 0, True)
    assert _segnet(tiny_data, out, "--iters", "0") == 2  # a bad flag: no run, still a status
    st = json.loads(status.read_text())
    assert (st["reason"], st["exit_status"]) == ("bad_input", 2) and "--iters" in st["message"]


def test_progress_lines_for_job_logs(tiny_data, tmp_path, capsys):
    """Not a terminal: one plain line every --progress-every seconds, no carriage returns."""
    out = tmp_path / "run"
    assert _segnet(tiny_data, out, "--iters", "3", "--eval-every", "3", "--progress",
                   "lines", "--progress-every", "0.000001", "--threads", "1") == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("segnet: iteration")]
    assert len(lines) >= 3 and "seg " in lines[0] and "it/s" in lines[0]
    assert lines[0].startswith("segnet: iteration 1/3 (33.3 %)") and "ETA" in lines[0]
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["threads"] == 1 and cfg["precision"]["autocast"] == "none"
    assert "precision: autocast none; TF32 convolutions" in (out / "log.txt").read_text()


def test_line_progress_by_hand():
    import io

    from sfc.train.progress import LineProgress

    t, buf = [0.0], io.StringIO()
    lp = LineProgress(100, initial=10, desc="accel", every=30.0, file=buf, clock=lambda: t[0])
    for _ in range(20):
        t[0] += 2.0  # 0.5 it/s
        lp.update(1)
    assert buf.getvalue().splitlines() == [  # one line, at 30 s
        "accel: iteration 25/100 (25.0 %), 0.50 it/s, ETA 0:02:30"]
    lp.close()
    assert buf.getvalue().splitlines()[-1].startswith("accel: iteration 30/100")
    lp.close()
    assert len(buf.getvalue().splitlines()) == 2
