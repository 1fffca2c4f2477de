"""The SYNTHIA-Seq smoke demo, interrupted and resumed (its own file, so that pytest-xdist's
`--dist loadfile` runs it beside the VIPER smoke demo of test_demo.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfc import demo

REPO = Path(__file__).resolve().parent.parent
RUNS = [run for run, *_ in demo.STAGES]


@pytest.mark.slow
def test_smoke_demo_synthia_interrupt_and_resume(tmp_path):
    """SOURCE=synthia_seq (12 classes, 11 evaluated); Ctrl-C during stage 4 prints the hint,
    and the next invocation skips stages 1-3 and finishes."""
    env = dict(os.environ, SOURCE="synthia_seq")
    cmd = [sys.executable, "-m", "sfc.demo", "--smoke", "--out", str(tmp_path)]
    # SIG_DFL in the child: a test runner started in the background (`cmd &`, nohup) passes
    # SIGINT on as ignored, and Ctrl-C could not be simulated.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"[4/{len(RUNS)}]"):
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
            break
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(seen) + rest + err
    assert demo.HINT in err
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("finished earlier") >= 3
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["source"] == "synthia_seq" and s["protocol"] == "synthia12"
    assert len(s["final_model"]["per_class"]) == 11
    assert list(s["final_model"]["per_class_not_in_mean"]) == ["fence"]
    for run in RUNS:
        assert (tmp_path / "runs" / "synthia_seq" / run / "best.pt").is_file()
