"""The control run (issue 12): the SFC stages' target forwards without the SFC loss, which
separates the loss from BatchNorm adaptation to the target."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

from sfc import train
from sfc.train.stages import build_stage
from sfc.train.streams import TrainStream, to_device

REPO = Path(__file__).resolve().parent.parent


def _args(stage, tiny_data, tiny_runs, *extra):
    argv = ["--stage", stage, "--data", str(tiny_data), "--out", "x", *TINY_TRAIN,
            "--flownet-ckpt", str(tiny_runs["accel"]), "--sfm-ckpt", str(tiny_runs["sfm"]),
            "--iters", "3"]
    if stage == "segnet":
        argv += ["--imagenet-init", "none", "--sfc-weight", "0.005"]
    else:
        argv += ["--chairs-init", "none", "--update-ckpt", str(tiny_runs["segnet"]),
                 "--reference-ckpt", str(tiny_runs["segnet"]), "--sfc-weight", "0.001"]
    return train.resolve(train.build_parser().parse_args(argv + list(extra)))


def _batches(cfg, n):
    data = train.build_data(cfg)
    src = TrainStream(data.source, seed=cfg.seed, stream=0)
    tgt = TrainStream(data.target, seed=cfg.seed, stream=1)
    return [(to_device(next(src), torch.device("cpu")), to_device(next(tgt), torch.device("cpu")))
            for _ in range(n)]


def _steps(cfg, batches, zero_weight=False):
    """The engine's iteration on given batches; `zero_weight`: the SFC loss computed and
    back-propagated with weight 0."""
    torch.manual_seed(cfg.seed)
    stage = build_stage(cfg, torch.device("cpu"), log=lambda s: None)
    if zero_weight:
        stage.cfg.sfc_weight = 0.0  # after construction: the SFC loss still runs, times 0
    grads = []
    for i, (src, tgt) in enumerate(batches):
        stage.train_mode()
        stage.set_iteration_lr(i)
        stage.optimizer.zero_grad(set_to_none=True)
        terms = stage.train_step(src, tgt)
        grads.append({n: p.grad.clone() for net in stage.main_nets
                      for n, p in stage.nets[net].named_parameters() if p.grad is not None})
        stage.optimizer.step()
    net = stage.nets[stage.main_nets[0]]
    return net, grads, terms, stage


@pytest.mark.parametrize("kind", ["segnet", "accel"])
def test_bn_control_equals_sfc_with_weight_zero(kind, tiny_data, tiny_runs, single_thread):
    cfg_sfc = _args(kind, tiny_data, tiny_runs)
    cfg_ctl = _args(kind, tiny_data, tiny_runs, "--bn-control")
    batches = _batches(cfg_sfc, 3)
    zero, g_zero, t_zero, _ = _steps(cfg_sfc, batches, zero_weight=True)
    ctl, g_ctl, t_ctl, stage = _steps(cfg_ctl, batches)
    assert "sfc" in t_zero and "sfc" not in t_ctl
    assert "sfm" not in stage.nets and "flownet_global" not in stage.nets  # not even loaded
    bufs_zero, bufs_ctl = dict(zero.named_buffers()), dict(ctl.named_buffers())
    assert any("running_mean" in k for k in bufs_ctl)
    for k, v in bufs_zero.items():  # the same BatchNorm updates, target forwards included
        assert torch.equal(v, bufs_ctl[k]), k
    for (k, v), w in zip(zero.state_dict().items(), ctl.state_dict().values()):
        assert torch.equal(v, w), k  # and the same parameters after 3 steps
    # the control's BN statistics differ from a source-only run's: the target forwards count
    src_only = _args(kind, tiny_data, tiny_runs, "--sfc-weight", "0",
                     "--warmup-order", cfg_ctl.warmup_order)  # the same LR rule
    so, g_so, _, _ = _steps(src_only, [(s, None) for s, _ in batches])
    assert any(not torch.equal(v, dict(so.named_buffers())[k]) for k, v in bufs_ctl.items()
               if "running" in k)
    # ... while its parameters received only the source gradient, step for step
    for gc, gs in zip(g_ctl, g_so):
        assert gc.keys() == gs.keys()
        for n in gc:
            assert torch.equal(gc[n], gs[n]), n


def test_bn_control_needs_an_sfc_stage(tiny_data, capsys):
    rc = train.main(["--stage", "segnet", "--data", str(tiny_data), "--out", "x", *TINY_TRAIN,
                     "--imagenet-init", "none", "--bn-control"])
    assert rc == 2 and "--bn-control applies to the SFC stages" in capsys.readouterr().err


def _dry(script, tmp_path, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("LAUNCH", "SOURCE", "BN_CONTROL")}
    e.update(DRY_RUN="1", SFC_OUT=str(tmp_path), SFC_DATA=str(tmp_path),
             SFC_WEIGHTS=str(tmp_path), **env)
    proc = subprocess.run(["bash", str(REPO / "exp" / script)], capture_output=True, text=True,
                          env=e, timeout=60)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ ")][0]
    cmd = shlex.split(line[2:])
    return {a: cmd[i + 1] for i, a in enumerate(cmd) if a.startswith("--")}, cmd


def test_bn_control_scripts_write_a_sibling_tree(tmp_path):
    one, cmd1 = _dry("SFC/stage_one/script/update.sh", tmp_path, BN_CONTROL="1")
    assert "--bn-control" in cmd1
    assert one["--out"] == str(tmp_path / "viper" / "SFC_bn_control/stage_one/update")
    two, cmd2 = _dry("SFC/stage_two/script/train.sh", tmp_path, BN_CONTROL="1")
    assert "--bn-control" in cmd2
    assert two["--out"] == str(tmp_path / "viper" / "SFC_bn_control/stage_two/train")
    assert two["--update-ckpt"] == str(tmp_path / "viper" / "SFC_bn_control/stage_one/update")
    assert two["--reference-ckpt"] == str(tmp_path / "viper"
                                          / "SFC_bn_control/stage_one/reference")
    assert two["--sfc-weight"] == "0.001"  # the same recipe otherwise
    plain, cmd = _dry("SFC/stage_two/script/train.sh", tmp_path)
    assert "--bn-control" not in cmd and plain["--out"].endswith("/SFC/stage_two/train")
