"""What each stage does in one training step (method §5, quirks 2, 6, 7), on fake batches."""

import pytest
import torch

from sfc import train
from sfc.models import DeepLabV2, FlowNetS
from sfc.train import stages

SMALL = ["--layers", "1", "1", "1", "1", "--width", "8", "--num-workers", "0"]
H, W = 32, 64


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Release-format files (bare state dicts) standing in for earlier stages' outputs."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(DeepLabV2(15, multi_level=True, layers=(1, 1, 1, 1), width=8).state_dict(),
               d / "segnet.pth")
    torch.save(FlowNetS().state_dict(), d / "flownet.pth")
    torch.save(FlowNetS().state_dict(), d / "sfm.pth")
    return d


def _cfg(*args):
    return train.resolve(train.build_parser().parse_args(["--out", "x", *SMALL, *args]))


def _batch(frames=2, labels=True):
    g = torch.Generator().manual_seed(frames)
    b = {"seg": torch.randn(1, 3, frames, H, W, generator=g) * 50,
         "flow": torch.rand(1, 3, frames, H, W, generator=g)}
    if labels:
        b["label"] = torch.randint(-1, 15, (1, H, W), generator=g)
    return b


def _bn_count(module):
    return int(module.bn1.num_batches_tracked)


@pytest.mark.parametrize("prev_forward,expect", [(True, 4), (False, 3)])
def test_sfc_stage_one_step(weights, prev_forward, expect):
    extra = [] if prev_forward else ["--no-source-prev-forward"]
    cfg = _cfg("--stage", "segnet", "--imagenet-init", "none", "--sfc-weight", "0.005",
               "--flownet-ckpt", str(weights / "flownet.pth"),
               "--sfm-ckpt", str(weights / "sfm.pth"), *extra)
    st = stages.build_stage(cfg, torch.device("cpu"), log=lambda m: None)
    frozen = {k: [p.detach().clone() for p in st.nets[k].parameters()]
              for k in ("flownet_global", "sfm")}
    st.train_mode()
    assert st.nets["segnet"].training and not st.nets["sfm"].training
    st.optimizer.zero_grad()
    terms = st.train_step(_batch(), _batch(labels=False))
    assert set(terms) == {"seg", "sfc"} and terms["sfc"] > 0
    # BN statistics: source t-1 (quirk 7, no_grad), source t, target t-1, target t
    assert _bn_count(st.nets["segnet"]) == expect
    st.optimizer.step()
    for k, before in frozen.items():  # quirk 6: frozen, no gradients, unchanged
        for p, q in zip(st.nets[k].parameters(), before):
            assert p.grad is None and not p.requires_grad and torch.equal(p, q)


def test_sfc_weight_scales_the_target_gradient(weights):
    """The SFC term reaches the SegNet with weight sfc_weight (source and target losses are
    back-propagated separately and their gradients add)."""
    grads = {}
    for w in ("0.005", "0.01"):
        torch.manual_seed(0)
        cfg = _cfg("--stage", "segnet", "--imagenet-init", "none", "--sfc-weight", w,
                   "--flownet-ckpt", str(weights / "flownet.pth"),
                   "--sfm-ckpt", str(weights / "sfm.pth"), "--no-source-prev-forward")
        st = stages.build_stage(cfg, torch.device("cpu"), log=lambda m: None)
        st.train_mode()
        src = _batch()
        src["label"].fill_(-1)  # no valid source pixel: only the SFC term has a gradient
        st.train_step(src, _batch(labels=False))
        grads[w] = st.nets["segnet"].layer6.conv2d_list[0].weight.grad.clone()
    assert grads["0.005"].abs().max() > 0
    torch.testing.assert_close(grads["0.01"], 2 * grads["0.005"], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("sfc,bn_per_backbone", [(False, 1), (True, 3)])
def test_accel_stage_step(weights, sfc, bn_per_backbone):
    args = ["--stage", "accel", "--chairs-init", "none",
            "--update-ckpt", str(weights / "segnet.pth"),
            "--reference-ckpt", str(weights / "segnet.pth")]
    if sfc:
        args += ["--sfc-weight", "0.001", "--flownet-ckpt", str(weights / "flownet.pth"),
                 "--sfm-ckpt", str(weights / "sfm.pth")]
    cfg = _cfg(*args)
    assert cfg.warmup_order == ("before" if sfc else "after")
    st = stages.build_stage(cfg, torch.device("cpu"), log=lambda m: None)
    accel = st.nets["accel"]
    conv1 = accel.net_update.conv1.weight.detach().clone()
    rm = accel.net_update.layer1[0].bn1.running_mean.clone()
    st.train_mode()
    assert accel.training and accel.net_ref.training  # quirk 2: frozen backbones in train mode
    st.optimizer.zero_grad()
    terms = st.train_step(_batch(), _batch(frames=3, labels=False) if sfc else None)
    assert set(terms) == ({"seg", "sfc"} if sfc else {"seg"})
    st.optimizer.step()
    assert _bn_count(accel.net_ref) == bn_per_backbone
    assert _bn_count(accel.net_update) == bn_per_backbone
    assert torch.equal(conv1, accel.net_update.conv1.weight)  # frozen backbone weights
    assert not torch.equal(rm, accel.net_update.layer1[0].bn1.running_mean)  # stats move
    assert accel.merge.weight.grad is not None and accel.flownet.conv1[0].weight.grad is not None
    # LR rule through the stage
    lrs = [st.lr_at(i) for i in (0, 1, 999, 1000, 1001)]
    assert lrs == ([5e-5, 5e-5, 5e-5, 5e-4, 5e-4] if sfc else [5e-4, 5e-5, 5e-5, 5e-5, 5e-4])


def test_sfm_stage_step(weights):
    cfg = _cfg("--stage", "sfm", "--flownet-ckpt", str(weights / "flownet.pth"))
    st = stages.build_stage(cfg, torch.device("cpu"), log=lambda m: None)
    # both start from the same FlowNet; only the SFM trains, with Adam
    for p, q in zip(st.nets["sfm"].parameters(), st.nets["flownet_global"].parameters()):
        assert torch.equal(p, q) and p.requires_grad and not q.requires_grad
    assert isinstance(st.optimizer, torch.optim.Adam)
    b = _batch()
    b["label_prev"] = b["label"].roll(1, dims=-1)
    b["label_down4x"] = b["label"][:, ::4, ::4]
    st.train_mode()
    st.optimizer.zero_grad()
    assert st.train_step(b, None)["sfm"] > 0
    st.optimizer.step()
    moved = any(not torch.equal(p, q) for p, q in
                zip(st.nets["sfm"].parameters(), st.nets["flownet_global"].parameters()))
    assert moved and st.lr_at(50000) == 1e-4


def test_inputs_resolve_run_dirs(tmp_path):
    from sfc.train import inputs

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="FlowNet_pretrain/stage_two/script/train.sh"):
        inputs.resolve(run, "best", "flownet")
    (run / "best.pt").write_bytes(b"")
    (run / "last.pt").write_bytes(b"")
    assert inputs.resolve(run, "best", "flownet") == run / "best.pt"
    assert inputs.resolve(run, "last", "flownet") == run / "last.pt"  # --select last
    with pytest.raises(FileNotFoundError, match="exp/SFM/script/train.sh"):
        inputs.resolve(tmp_path / "nothing.pt", "best", "sfm")
