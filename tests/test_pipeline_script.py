"""`exp/pipeline.sh`: the seven stage scripts in order, the stage-one pairs one after the other
or side by side (SIDE_BY_SIDE=1), the first failure's status, a stop passed on to the runs.
`sfc.train` is replaced by a stub (PYTHON) that logs when each run starts and ends and writes
its best.pt; the stage scripts themselves are the real ones (tests/test_scripts.py)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ORDER = ["FlowNet_pretrain/stage_one/update", "FlowNet_pretrain/stage_one/reference",
         "FlowNet_pretrain/stage_two/train", "SFM/train", "SFC/stage_one/update",
         "SFC/stage_one/reference", "SFC/stage_two/train"]

STUB = r"""#!/usr/bin/env bash
# stands in for `python -m sfc.train`: logs start/end (or the signal), writes best.pt
out=""; prev=""
for a in "$@"; do [[ "$prev" == "--out" ]] && out="$a"; prev="$a"; done
name="${out#"$SFC_OUT"/viper/}"
stop() {  # as sfc.train: finish, save last.pt (a second), exit 128 + signal
  echo "signal $name" >> "$STUB_LOG"; sleep 1; echo "saved $name" >> "$STUB_LOG"; exit "$1"
}
trap 'stop 143' TERM
trap 'stop 138' USR1
echo "start $name $(date +%s.%N)" >> "$STUB_LOG"
[[ -n "${STUB_MPS_LOG:-}" ]] && echo "$name ${CUDA_MPS_PIPE_DIRECTORY:-none}" >> "$STUB_MPS_LOG"
[[ -n "${STUB_JOBS_LOG:-}" ]] && echo "$name ${SFC_JOBS_PER_NODE:-unset}" >> "$STUB_JOBS_LOG"
case "$name" in  # STUB_PAIR_SLEEP: the stage-one runs only (the overlap test)
  *stage_one*) sleep "${STUB_PAIR_SLEEP:-${STUB_SLEEP:-0.3}}" & wait $! ;;
  *) sleep "${STUB_SLEEP:-0.3}" & wait $! ;;
esac
echo "end $name $(date +%s.%N)" >> "$STUB_LOG"
[[ "${STUB_FAIL:-}" == "$name" ]] && exit 3
mkdir -p "$out" && touch "$out/best.pt"
"""


def _env(tmp_path, **kw):
    stub = tmp_path / "stub.sh"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("LAUNCH", "SOURCE", "DRY_RUN")}
    env.update(SFC_OUT=str(tmp_path / "out"), SFC_DATA=str(tmp_path / "data"),
               SFC_WEIGHTS=str(tmp_path / "weights"), PYTHON=str(stub),
               STUB_LOG=str(tmp_path / "log.txt"), **kw)
    return env


ARGS = ["--imagenet-init", "none", "--chairs-init", "none"]


def _pipeline(tmp_path, **env):
    proc = subprocess.run(["bash", str(REPO / "exp" / "pipeline.sh"), *ARGS],
                          capture_output=True, text=True, env=_env(tmp_path, **env),
                          timeout=120)
    return proc, _log(tmp_path)


def _log(tmp_path):
    p = tmp_path / "log.txt"
    rows = [ln.split() for ln in p.read_text().splitlines()] if p.is_file() else []
    return [(r[0], r[1], float(r[2]) if len(r) > 2 else None) for r in rows]


def test_runs_in_order_one_after_the_other(tmp_path):
    proc, log = _pipeline(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [name for what, name, _ in log if what == "start"] == ORDER
    assert [what for what, _, _ in log] == ["start", "end"] * 7  # never two at once
    assert "== pipeline: done" in proc.stderr


def test_side_by_side_overlaps_each_stage_one_pair_only(tmp_path):
    jobs = tmp_path / "jobs.txt"
    proc, log = _pipeline(tmp_path, SIDE_BY_SIDE="1", STUB_PAIR_SLEEP="2",
                          STUB_JOBS_LOG=str(jobs))
    assert proc.returncode == 0, proc.stderr
    # the pairs know they share the node (--num-workers auto halves their workers)
    shares = dict(ln.split() for ln in jobs.read_text().splitlines())
    assert shares == {name: "2" if "stage_one" in name else "unset" for name in ORDER}
    t = {(what, name): at for what, name, at in log}
    for stage in ("FlowNet_pretrain/stage_one", "SFC/stage_one"):
        u, r = f"{stage}/update", f"{stage}/reference"
        assert t[("start", r)] < t[("end", u)] and t[("start", u)] < t[("end", r)]
    for before, after in (("FlowNet_pretrain/stage_one/reference",
                           "FlowNet_pretrain/stage_two/train"),
                          ("FlowNet_pretrain/stage_one/update",
                           "FlowNet_pretrain/stage_two/train"),
                          ("SFM/train", "SFC/stage_one/update"),
                          ("SFC/stage_one/update", "SFC/stage_two/train"),
                          ("SFC/stage_one/reference", "SFC/stage_two/train")):
        assert t[("end", before)] <= t[("start", after)]


MPS_STUB = r"""#!/usr/bin/env bash
# stands in for nvidia-cuda-mps-control: logs "-d" (with its pipe directory) and "quit"
if [[ "${1:-}" == "-d" ]]; then
  [[ -d "$CUDA_MPS_PIPE_DIRECTORY" && -d "$CUDA_MPS_LOG_DIRECTORY" ]] || exit 1
  echo "daemon $CUDA_MPS_PIPE_DIRECTORY" >> "$STUB_MPS_LOG"
else
  read -r cmd; echo "$cmd $CUDA_MPS_PIPE_DIRECTORY" >> "$STUB_MPS_LOG"
fi
"""


@pytest.mark.parametrize("fail", [None, "SFC/stage_one/update"])
def test_mps_daemon_serves_the_runs_and_is_quit_at_the_end(tmp_path, fail):
    """MPS=1 SIDE_BY_SIDE=1: a private MPS control daemon is started before the first run, every
    run is its client (CUDA_MPS_PIPE_DIRECTORY), and it is quit and its folder removed when the
    pipeline ends — also when a run fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-cuda-mps-control").write_text(MPS_STUB)
    (bin_dir / "nvidia-cuda-mps-control").chmod(0o755)
    mps_log = tmp_path / "mps.txt"
    env = {"SIDE_BY_SIDE": "1", "MPS": "1", "STUB_MPS_LOG": str(mps_log),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    if fail:
        env["STUB_FAIL"] = fail
    proc, log = _pipeline(tmp_path, **env)
    assert proc.returncode == (3 if fail else 0), proc.stderr
    rows = [ln.split() for ln in mps_log.read_text().splitlines()]
    assert rows[0][0] == "daemon" and rows[-1][0] == "quit"
    pipes = rows[0][1]
    assert Path(pipes).name == "pipe" and rows[-1][1] == pipes
    runs = rows[1:-1]
    started = [n for w, n, _ in log if w == "start"]
    assert sorted(r[0] for r in runs) == sorted(started) and len(started) == (6 if fail else 7)
    assert all(r[1] == pipes for r in runs)
    assert not Path(pipes).parent.exists()  # the private folder removed
    assert "MPS control daemon started" in proc.stderr


def test_mps_needs_side_by_side_and_the_control_binary(tmp_path):
    proc, log = _pipeline(tmp_path, MPS="1")
    assert proc.returncode == 2 and "set SIDE_BY_SIDE=1 too" in proc.stderr and log == []
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not (Path(d) / "nvidia-cuda-mps-control").exists())
    proc = subprocess.run(["bash", str(REPO / "exp" / "pipeline.sh"), *ARGS],
                          capture_output=True, text=True, timeout=60,
                          env=_env(tmp_path, MPS="1", SIDE_BY_SIDE="1", PATH=path))
    assert proc.returncode == 2
    assert "MPS=1 needs nvidia-cuda-mps-control" in proc.stderr


def test_a_failure_stops_the_pipeline_with_its_status(tmp_path):
    for side in ("0", "1"):
        (tmp_path / side).mkdir()
        proc, log = _pipeline(tmp_path / side, SIDE_BY_SIDE=side,
                              STUB_FAIL="SFC/stage_one/reference")
        assert proc.returncode == 3
        assert "SFC/stage_one/script/reference.sh exited 3; stopping" in proc.stderr
        started = [name for what, name, _ in log if what == "start"]
        assert started == ORDER[:6] or sorted(started) == sorted(ORDER[:6])
        assert ("end", "SFC/stage_one/update") in [(w, n) for w, n, _ in log]


def _stop_midway(tmp_path, script, starts, sig, **env):
    """Start `script`, wait for `starts` runs to have started, signal its whole process group
    (as Ctrl-C or a SLURM job step would), return (exit status, the log when it exited)."""
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:  # not a pipe: the runs' copies would hold it open after exit
        proc = subprocess.Popen(["bash", str(REPO / "exp" / script), *ARGS],
                                env=_env(tmp_path, STUB_SLEEP="30", **env),
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.time() + 30
        while (sum(w == "start" for w, _, _ in _log(tmp_path)) < starts
               and time.time() < deadline):
            time.sleep(0.1)
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=30)
    log = _log(tmp_path)  # read the moment the script exited
    time.sleep(1.5)  # let any run it left behind finish before tmp_path goes
    return rc, log, err.read_text()


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_stop_reaches_both_runs_of_a_pair_and_is_waited_for(tmp_path, sig, status):
    """SIGTERM (a job's end) or SIGUSR1 (SLURM's time-limit signal; exp/slurm/job.sbatch
    requeues on 138) to the process group while the first pair trains side by side: both runs
    get it once and save, the pipeline exits only after both saved, with their status, and
    starts nothing more."""
    rc, log, err = _stop_midway(tmp_path, "pipeline.sh", 2, sig, SIDE_BY_SIDE="1")
    assert rc == status, err
    assert sorted(n for w, n, _ in log if w == "saved") == sorted(ORDER[:2])
    assert sorted(n for w, n, _ in log if w == "signal") == sorted(ORDER[:2])  # once each
    assert sorted(n for w, n, _ in log if w == "start") == sorted(ORDER[:2])


def test_a_stop_in_turn_stops_the_run_in_progress_only(tmp_path):
    rc, log, err = _stop_midway(tmp_path, "pipeline.sh", 1, signal.SIGTERM)
    assert rc == 143, err
    assert [(w, n) for w, n, _ in log] == [("start", ORDER[0]), ("signal", ORDER[0]),
                                            ("saved", ORDER[0])]


def test_a_stage_script_outlives_the_signal_until_its_run_saved(tmp_path):
    """A stage script alone (exp/common.sh run_train) signalled with its run, as SLURM signals
    every process of a job step: it does not die first — it exits after the run's save, with
    the run's status (a shell that died first would end the SLURM step mid-save)."""
    rc, log, err = _stop_midway(tmp_path, "FlowNet_pretrain/stage_one/script/update.sh", 1,
                                signal.SIGUSR1)
    assert rc == 138, err
    assert [(w, n) for w, n, _ in log] == [("start", ORDER[0]), ("signal", ORDER[0]),
                                            ("saved", ORDER[0])]


def test_dry_run_prints_the_seven_commands(tmp_path):
    proc, log = _pipeline(tmp_path, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    outs = [ln.split("--out ")[1].split()[0] for ln in proc.stdout.splitlines()
            if ln.startswith("+ ")]
    assert [o.split("/viper/", 1)[1] for o in outs] == ORDER
    assert log == []  # nothing ran
