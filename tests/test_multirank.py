"""Several processes fail and resume like one (issue 17): two ranks under `torchrun` (gloo,
CPU) with a corrupt frame only rank 1 reads, a signal to rank 1 only, a killed rank, and a
resume in which the ranks see different checkpoints. Every rank stops at the same iteration
with the same documented exit status, rank 0 saves `last.pt`, logs the reason and the rank it
came from, and writes `status.json`; one-line errors print once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN
from test_cluster import _wait_for_iterations

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--monitor-interval=0.2"]
SEGNET = ["--stage", "segnet", *TINY_TRAIN, "--imagenet-init", "none", "--device", "cpu",
          "--progress", "lines"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    env.update(extra)
    return env


def _torchrun(data, out, *extra, wait=True, **popen):
    cmd = [*TORCHRUN, "-m", "sfc.train", *SEGNET, "--data", str(data), "--out", str(out),
           *map(str, extra)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


def _status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def _last_iter(out: Path) -> int:
    return torch.load(out / "last.pt", weights_only=True, map_location="cpu")["iter"]


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def _rank_pid(launcher: int, rank: int, timeout=60.0) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for pid in _children(launcher):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under pid {launcher}")


def _sfc_traceback(stderr: str) -> bool:
    """A traceback through sfc's code or a raw collective failure (torchrun's own
    ChildFailedError block is expected whenever a worker exits non-zero)."""
    return "/sfc/" in stderr or "Connection closed" in stderr


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("sfc.train: error:")]


@pytest.mark.slow
def test_corrupt_frame_read_by_rank_one_only(tiny_data, tmp_path):
    """Rank 1's second clip is unreadable: both ranks stop before iteration 2, rank 0 saves
    last.pt at iteration 1 and names rank 1; one error line; status.json says data_error."""
    from sfc.data import make_dataset
    from sfc.train.streams import TrainStream

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    ds = make_dataset("viper", data, split="train", frames=2, size=(64, 32), raw=True)
    rank1 = TrainStream(ds, 1, 0, 0, rank=1, world_size=2)._indices(0)
    rank0 = TrainStream(ds, 1, 0, 0, rank=0, world_size=2)._indices(0)
    assert rank1[1] not in rank0[:2]  # only rank 1 reads it in the first two iterations
    seq, f = ds.items[rank1[1]]
    ds.image_path(seq, f).write_bytes(b"not a png")
    out = tmp_path / "run"
    rc, stdout, stderr = _torchrun(data, out, "--iters", "6", "--eval-every", "100")
    assert rc != 0  # torchrun's own status; the stage scripts pass the run's on (below)
    st = _status(out)
    assert (st["reason"], st["exit_status"], st["rank"], st["iteration"]) == (
        "data_error", 2, 1, 1), st
    assert _last_iter(out) == 1 and st["resumable"] is True
    log = (out / "log.txt").read_text()
    assert "stopping: data error at iteration 2 (from rank 1):" in log
    assert str(ds.image_path(seq, f)) in log
    errs = _errors(stderr)
    assert len(errs) == 1 and errs[0].endswith("(from rank 1)"), stderr[-3000:]
    assert str(ds.image_path(seq, f)) in errs[0]
    assert not _sfc_traceback(stderr), stderr[-3000:]  # (torchrun prints its own block)


@pytest.mark.slow
def test_signal_to_rank_one_only_and_the_stage_script_status(tiny_data, tmp_path):
    """SIGUSR1 to rank 1 only (as `scancel --signal` to one task): every rank stops at the
    same iteration, rank 0 logs SIGUSR1 from rank 1 and saves last.pt; the stage script under
    torchrun exits 138 (torchrun itself exits 1); the same command resumes (with deferred
    finiteness checks, read by both ranks before the save)."""
    out = tmp_path / "SFC" / "run"
    script_env = _env(LAUNCH=" ".join(TORCHRUN), SFC_DATA=str(tiny_data),
                      SFC_OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    cmd = ["bash", str(REPO / "exp/FlowNet_pretrain/stage_one/script/update.sh"), *SEGNET[2:],
           "--iters", "100000", "--eval-every", "100000", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_iterations(out, 3, proc)
    launcher = next(p for p in _children(proc.pid))
    os.kill(_rank_pid(launcher, 1), signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 138, stdout[-2000:] + stderr[-2000:]
    st = _status(out)
    assert (st["reason"], st["signal"], st["rank"], st["exit_status"]) == (
        "signal", "SIGUSR1", 1, 138)
    log = (out / "log.txt").read_text()
    assert f"stopped at iteration {st['iteration']} (SIGUSR1 (from rank 1))" in log
    assert "--stop-after" not in log
    assert _last_iter(out) == st["iteration"] > 0
    # resumed with deferred finiteness checks: both ranks read them (one collective) before the
    # save of --stop-after
    again = subprocess.run([*cmd, "--stop-after", str(st["iteration"] + 2), "--check-every",
                            "5", "--log-every", "1000"], cwd=REPO,
                           env=script_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _status(out)["reason"] == "stop_after" and _last_iter(out) == st["iteration"] + 2
    assert f"resumed from {out / 'last.pt'} at iteration {st['iteration']}" in (
        out / "log.txt").read_text()


@pytest.mark.slow
def test_a_killed_rank_leaves_rank_zero_saving(tiny_data, tmp_path):
    """SIGKILL of rank 1 (the OOM killer, a node failure): rank 0 learns it from the next
    collective, saves the state of the last iteration boundary, says so in one line, exits 5."""
    out = tmp_path / "run"
    proc = _torchrun(tiny_data, out, "--iters", "100000", "--eval-every", "100000",
                     wait=False)
    _wait_for_iterations(out, 3, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    st = _status(out)
    assert (st["reason"], st["exit_status"]) == ("peer_failed", 5), (st, stderr[-2000:])
    assert _last_iter(out) == st["iteration"] > 0
    log = (out / "log.txt").read_text()
    assert "stopping: another process of the run is gone" in log
    assert f"last.pt saved at iteration {st['iteration']}" in log
    assert not (out / ".lock").exists()
    # (a resume after a multi-rank stop: test_signal_to_rank_one_only_and_the_stage_script_status)


def _mismatch_worker(rank, world, port, argv, dump):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sfc import dist, train
    from sfc.train import runio

    if rank == 1:  # a shared file system that has not caught up: no last.pt seen here
        runio.check_resume = lambda *a, **k: None
    rc = train.main(argv)
    Path(dump, f"rank{rank}.json").write_text(json.dumps({"rc": rc}))
    dist.cleanup()


@pytest.mark.slow
def test_ranks_that_resume_different_states_stop(tiny_data, tmp_path, capfd):
    import socket

    import torch.multiprocessing as mp

    out = tmp_path / "run"
    argv = [*SEGNET, "--data", str(tiny_data), "--out", str(out), "--iters", "6",
            "--eval-every", "100"]
    rc, _, stderr = _torchrun(tiny_data, out, "--iters", "6", "--eval-every", "100",
                              "--stop-after", "2")
    assert rc == 0 and _last_iter(out) == 2, stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_mismatch_worker, args=(2, port, argv, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    rcs = [json.loads((tmp_path / f"rank{r}.json").read_text())["rc"] for r in (0, 1)]
    assert rcs == [2, 2]
    st = _status(out)
    assert st["reason"] == "resume_mismatch" and st["exit_status"] == 2
    assert "rank 0 at iteration 2, rank 1 at iteration 0" in st["message"]
    err = capfd.readouterr().err
    assert len(_errors(err)) == 1, err[-2000:]
    assert _last_iter(out) == 2  # nothing overwritten


def test_one_line_errors_print_once_under_torchrun(monkeypatch, capsys):
    """A bad flag or bad input under torchrun: only rank 0 prints the line (every rank exits 2);
    the stage scripts' exit status through a launcher: tests/test_scripts.py."""
    from sfc import flags, train

    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            train.build_parser().parse_args(["--stage", "segnet", "--out", "x", "--no-such"])
        assert e.value.code == 2
        assert flags.report("sfc.train", ValueError("bad")) == 2
        err = capsys.readouterr().err
        assert ("sfc.train: error: bad" in err) == printed
        assert ("unrecognized arguments" in err) == printed
