"""Benchmark fast paths keep the numbers (issue 6). No timing assertions: timings live in
`python -m sfc.bench`; these tests check equality of the fast paths and the CLI's output shape.
"""

import json
import math

import pytest
import torch

from sfc import losses
from sfc.bench import report, steps
from sfc.bench.cli import main as bench_main
from sfc.bench.fastopt import check_exact
from sfc.bench.reference import (
    ReleaseSegNetSFC,
    release_sf,
    release_sfc_loss,
    release_sfm_loss,
)
from sfc.bench.run import measure_reference
from sfc.models import Accel, DeepLabV2, FlowNetS

TINY = {"layers": (1, 1, 1, 1), "width": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast and immune to a busy machine's
    oversubscription (OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _flow_nets(dtype):
    torch.manual_seed(1)
    return FlowNetS().to(dtype).eval(), FlowNetS().to(dtype).eval()


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_release_sfc_loss_equals_project(dtype, rtol):
    """Stage-one SFC loss (main + 0.1·aux, 15 classes): loop of SFM calls with SFM gradients
    (release) == one B·C batch with a frozen SFM (project) — value and gradient to the logits."""
    fg, sfm = _flow_nets(dtype)
    g = torch.Generator().manual_seed(0)
    h, w = 32, 64
    img_p, img_c = (torch.rand(1, 3, h, w, generator=g, dtype=dtype) for _ in range(2))
    logits = [torch.randn(1, 15, h // 8, w // 8, generator=g, dtype=dtype) * 0.05
              for _ in range(4)]
    a = [x.clone().requires_grad_(True) for x in logits]
    b = [x.clone().requires_grad_(True) for x in logits]
    sfm_ref = FlowNetS().to(dtype)
    sfm_ref.load_state_dict(sfm.state_dict())
    l_proj = losses.sfc_loss((a[0], a[1]), (a[2], a[3]), img_p, img_c, fg, sfm)
    l_ref = release_sfc_loss((b[0], b[1]), (b[2], b[3]), img_p, img_c, fg, sfm_ref)
    torch.testing.assert_close(l_proj, l_ref.to(l_proj.dtype), rtol=rtol, atol=0)
    l_proj.backward()
    l_ref.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=rtol * 10, atol=rtol * 1e-3)
    assert all(p.grad is None for p in sfm.parameters())  # project never touches the SFM
    assert all(p.grad is not None for p in sfm_ref.parameters())  # the release computed them


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_release_sfm_loss_equals_project(dtype, rtol):
    """SFM pre-training loss (absent classes skipped, masked EPE): value and SFM gradients."""
    fg, sfm = _flow_nets(dtype)
    g = torch.Generator().manual_seed(0)
    h, w = 32, 64
    img_p, img_c = (torch.rand(2, 3, h, w, generator=g, dtype=dtype) for _ in range(2))
    gt_p = torch.randint(-1, 6, (2, h, w), generator=g)  # classes 6..14 absent
    gt_c = torch.randint(-1, 4, (2, h, w), generator=g)
    gt_c[1, :4] = 9  # a class present in one sample and one frame only
    down = torch.randint(-1, 6, (2, h // 4, w // 4), generator=g)
    sfm_ref = FlowNetS().to(dtype)
    sfm_ref.load_state_dict(sfm.state_dict())
    l_proj = losses.sfm_loss(img_p, img_c, gt_p, gt_c, fg, sfm, down)
    l_ref = release_sfm_loss(img_p, img_c, gt_p, gt_c, fg, sfm_ref, down)
    torch.testing.assert_close(l_proj, l_ref.to(l_proj.dtype), rtol=rtol, atol=0)
    l_proj.backward()
    l_ref.backward()
    for p, q in zip(sfm.parameters(), sfm_ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol * 10, atol=rtol * 1e-3)


def test_release_sf_loop_equals_batched_present():
    """The per-class loop with `present` == the project's batched `segmentation_based_flow`."""
    _, sfm = _flow_nets(torch.float64)
    g = torch.Generator().manual_seed(3)
    m_p, m_c = (torch.rand(2, 5, 16, 24, generator=g, dtype=torch.float64) for _ in range(2))
    img_p, img_c = (torch.rand(2, 3, 16, 24, generator=g, dtype=torch.float64) for _ in range(2))
    present = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    ref = release_sf(m_p, m_c, img_p, img_c, sfm, present)
    proj = losses.segmentation_based_flow(m_p, m_c, img_p, img_c, sfm, present=present)
    torch.testing.assert_close(proj, ref, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(ref[1]) == 0  # no class present: exactly 0, not SFM(0)


def test_release_sfc_stage_one_lockstep_equals_project_stage():
    """The real SegNet stage (SFC stage one, tiny backbone) and the release-style step from the
    same state: equal losses over 2 iterations and equal parameters and BN statistics after."""
    bc = steps.BenchConfig(source_size=(64, 32), target_size=(64, 32), **TINY)
    stage = steps.build("segnet_sfc", bc)
    ref = ReleaseSegNetSFC(stage)
    src, tgt = steps.make_batches("segnet_sfc", bc)
    for i in range(2):
        a = ref.step(src, tgt, i)
        b = steps.train_iteration(stage, src, tgt, i)
        for k in b:
            assert math.isclose(a[k], b[k], rel_tol=1e-4), (i, k, a[k], b[k])
    sd_ref, sd_proj = ref.net.state_dict(), stage.nets["segnet"].state_dict()
    for k, v in sd_proj.items():
        torch.testing.assert_close(v, sd_ref[k], rtol=1e-4, atol=1e-6, msg=k)
    # the release computes (and never applies) SFM gradients; the project never makes them
    assert any(p.grad is not None for p in ref.sfm.parameters())
    assert all(p.grad is None for p in stage.nets["sfm"].parameters())


def test_measure_reference_reports_equal_losses():
    bc = steps.BenchConfig(source_size=(64, 32), target_size=(64, 32), **TINY)
    rec = measure_reference("sfm", bc, iters=1, warmup=0, log=lambda s: None)
    assert rec["losses_equal"] and rec["max_rel_loss_diff"] <= 1e-4
    assert rec["speedup"] > 0 and math.isfinite(rec["speedup"])


def test_measure_reference_with_the_graph_runner_keeps_lockstep():
    """With --cuda-graph the project's step runs through the graph runner (emulated on the
    CPU) past its warm-up and capture; the release-style reference, synced from the project's
    state before each iteration, still gives the same losses."""
    bc = steps.BenchConfig(source_size=(64, 32), target_size=(64, 32), check_every="5",
                           cuda_graph=True, **TINY)
    lines = []
    rec = measure_reference("segnet_sfc", bc, iters=2, warmup=0, log=lines.append)
    assert rec["cuda_graph"] == "emulated"
    assert len(lines) == 4 + 2  # warm-up raised to the runner's 3 eager calls and its capture
    assert rec["losses_equal"] and rec["max_rel_loss_diff"] <= 1e-4


def _channels_last(module, *xs):
    module = module.eval()
    with torch.no_grad():
        ref = module(*xs)
        cl = module.to(memory_format=torch.channels_last)
        xs_cl = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
                 for x in xs]
        out = cl(*xs_cl)
    return ref, out


@pytest.mark.parametrize("net", ["deeplab", "flownet", "accel"])
def test_channels_last_output_equals_default_layout(net):
    g = torch.Generator().manual_seed(0)
    if net == "deeplab":
        m, xs = DeepLabV2(15, multi_level=True, **TINY), [torch.randn(1, 3, 64, 96, generator=g)]
    elif net == "flownet":
        m, xs = FlowNetS(), [torch.rand(2, 6, 64, 96, generator=g)]
    else:
        m = Accel(15, **TINY)
        xs = [torch.randn(1, 3, 2, 64, 96, generator=g), torch.rand(1, 3, 2, 64, 96, generator=g)]
    ref, out = _channels_last(m, *xs)
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,),
                    out if isinstance(out, tuple) else (out,)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_bench_cli_json_structure(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = bench_main(["--device", "cpu", "--size", "64", "32", "--layers", "1", "1", "1", "1",
                     "--width", "8", "--iters", "1", "--warmup", "0", "--eval-images", "1",
                     "--threads", "1", "--reference", "--reference-stages", "segnet_sfc",
                     "--json", str(path)])
    assert rc == 0
    res = json.loads(path.read_text())
    assert set(res) >= {"meta", "stages", "pipeline", "reference", "loaders"}
    assert [r["kind"] for r in res["stages"]] == list(steps.KINDS)
    for r in res["stages"]:
        for k in ("step_s", "flops_per_step", "tflops_per_s", "peak_mem_bytes",
                  "eval_s_per_image"):
            assert _finite(r[k]) and r[k] > 0, (r["kind"], k, r[k])
        assert r["source_size"] == [64, 32] and len(r["step_times_s"]) == 1
        assert all(_finite(v) for v in r["loss_terms"].values()) and r["loss_terms"]
    sfc_terms = {r["kind"]: set(r["loss_terms"]) for r in res["stages"]}
    assert sfc_terms["segnet_sfc"] == {"seg", "sfc"} and sfc_terms["sfm"] == {"sfm"}
    pipe = res["pipeline"]["fp32"]
    assert len(pipe["runs"]) == 7 and _finite(pipe["total_h"]) and pipe["total_h"] > 0
    assert sum(r["iters"] for r in pipe["runs"]) == 720_000
    (ref,) = res["reference"]
    assert ref["kind"] == "segnet_sfc" and ref["losses_equal"] and _finite(ref["speedup"])
    table = path.with_suffix(".md").read_text()
    assert "segnet_sfc" in table and "speed-up" in table
    assert "| accel_sfc |" in capsys.readouterr().out


def test_bench_cuda_graph_both_gives_an_eager_and_a_graph_row(tmp_path):
    """`--cuda-graph both`: per captured kind an eager row then a graph row (emulated on the
    CPU, and labelled so), the SFM once (eager), and a pipeline from the faster row per kind
    beside the eager one (on the CPU: the eager row, an emulated one is no timing); without
    deferred checks it refuses."""
    path = tmp_path / "bench.json"
    common = ["--device", "cpu", "--size", "64", "32", "--layers", "1", "1", "1", "1",
              "--width", "8", "--iters", "1", "--warmup", "0", "--eval-images", "0",
              "--no-flops", "--threads", "1", "--stages", "segnet", "sfm"]
    with pytest.raises(SystemExit, match="--check-every N > 1"):
        bench_main([*common, "--cuda-graph", "on"])
    assert bench_main([*common, "--cuda-graph", "both", "--check-every", "5",
                       "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    rows = [(r["kind"], r["cuda_graph"]) for r in res["stages"]]
    assert rows == [("segnet", False), ("segnet", "emulated"), ("sfm", False)]
    graph_row = res["stages"][1]
    assert report.config_label(graph_row) == "fp32 checks/5 graph (emulated)"
    assert graph_row["opt_s"] is None and graph_row["loss_terms"]["seg"] > 0
    assert graph_row["capture_s"] > 0 and res["stages"][0]["capture_s"] is None
    pipe = res["pipeline"]
    assert set(pipe) == {"fp32", "fp32, fastest with --cuda-graph"}
    # an emulated graph row times nothing real: the pipeline takes the eager one
    eager = res["stages"][0]["step_s"]
    assert pipe["fp32, fastest with --cuda-graph"]["runs"][0]["train_h"] == pytest.approx(
        eager * 80_000 / 3600)


def test_bench_stack_forwards_both_rows_and_table(tmp_path):
    """`--stack-forwards both`: an SFC kind gets a row with its target forwards apart, then a
    stacked one (labelled; the stacked path really taken: the row says so only when the stage
    stacks), a non-SFC kind one row; the stacked table compares the two; `--reference` runs
    the project's step stacked too and the losses still equal the release-style ones."""
    path = tmp_path / "bench.json"
    assert bench_main(["--device", "cpu", "--size", "64", "32", "--layers", "1", "1", "1", "1",
                       "--width", "8", "--iters", "1", "--warmup", "0", "--eval-images", "0",
                       "--no-flops", "--threads", "1", "--stages", "segnet", "segnet_sfc",
                       "--stack-forwards", "both", "--reference", "--reference-stages",
                       "segnet_sfc", "--reference-iters", "1", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    rows = [(r["kind"], r["stack_forwards"]) for r in res["stages"]]
    assert rows == [("segnet", False), ("segnet_sfc", False), ("segnet_sfc", True)]
    assert report.config_label(res["stages"][2]) == "fp32 stacked"
    assert [(r["kind"], r["stack_forwards"], r["losses_equal"]) for r in res["reference"]] == [
        ("segnet_sfc", False, True), ("segnet_sfc", True, True)]
    table = report.stacked_table(res["stages"])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[2].startswith("| segnet_sfc | fp32 | ")
    assert "`--stack-forwards`" in path.with_suffix(".md").read_text()


def test_bench_eval_batch_size_times_both_and_the_pipeline_takes_the_batched(tmp_path):
    """`--eval-batch-size 2`: the row's evaluation is timed in batches of 2 and at batch 1,
    the table shows both, the pipeline's evaluation hours come from the batched time."""
    path = tmp_path / "bench.json"
    common = ["--device", "cpu", "--size", "64", "32", "--layers", "1", "1", "1", "1",
              "--width", "8", "--iters", "1", "--warmup", "0", "--no-flops", "--threads", "1",
              "--stages", "segnet", "--eval-images", "2"]
    with pytest.raises(SystemExit, match="--eval-batch-size 0"):
        bench_main([*common, "--eval-batch-size", "0"])
    assert bench_main([*common, "--eval-batch-size", "2", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    row = res["stages"][0]
    assert row["eval_batch_size"] == 2
    assert row["eval_s_per_image"] > 0 and row["eval_s_per_image_batch1"] > 0
    cell = report.eval_cell(row)
    assert cell == (f"{row['eval_s_per_image'] * 1e3:.1f} (batch 2; batch 1: "
                    f"{row['eval_s_per_image_batch1'] * 1e3:.1f})")
    run = res["pipeline"]["fp32"]["runs"][0]
    assert run["eval_h"] == pytest.approx(row["eval_s_per_image"] * run["evals"]
                                          * run["val_images"] / 3600)
    assert report.eval_cell({**row, "eval_batch_size": 1}) == f"{row['eval_s_per_image'] * 1e3:.1f}"


def test_stacked_table_by_hand():
    """Plain against stacked of the same configuration (graph rows with graph rows), speed-up
    plain / stacked; side-by-side rows and unmatched rows left out."""
    def row(kind, step, stack=False, graph=False, side=None):
        return {"kind": kind, "precision": "fp32", "step_s": step, "cuda_graph": graph,
                "side_by_side": side, "stack_forwards": stack}

    table = report.stacked_table([
        row("segnet_sfc", 0.150), row("segnet_sfc", 0.120, True),
        row("segnet_sfc", 0.100, graph=True), row("segnet_sfc", 0.080, True, True),
        row("segnet_sfc", 0.050, True, True, side=2), row("accel_sfc", 0.100, True)])
    lines = table.splitlines()
    assert lines[2:] == ["| segnet_sfc | fp32 | 150.0 | 120.0 | 1.25× | — | — |",
                         "| segnet_sfc | fp32 graph | 100.0 | 80.0 | 1.25× | — | — |"]
    assert report.stacked_table([row("segnet_sfc", 0.1)]) == ""


def test_loader_measurement_on_tiny_tree(tmp_path):
    from sfc.bench.loaders import LOADERS, measure_loaders
    from sfc.data.synthetic import generate

    generate(tmp_path, seed=0, datasets=("viper", "cityscapes"), tiny=True)
    res = measure_loaders(1, {"segnet_sfc": 0.5, "sfm": 0.25}, data_root=tmp_path,
                          log=lambda s: None)
    assert set(res["samples_per_s_one_worker"]) == set(LOADERS)
    assert all(_finite(v) and v > 0 for v in res["samples_per_s_one_worker"].values())
    assert set(res["workers_needed"]) == {"segnet_sfc", "sfm"}
    assert set(res["workers_needed"]["segnet_sfc"]) == {"viper_f2", "cityscapes_f2"}
    assert all(n >= 1 for v in res["workers_needed"].values() for n in v.values())


def test_foreach_repeated_sgd_is_bit_exact_cpu():
    check_exact("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_foreach_repeated_sgd_is_bit_exact_cuda():
    check_exact("cuda")


def test_kernel_kinds_and_the_gpu_time_table():
    """Real kernel names of an H200 profile, by hand, and the table of a profiled row."""
    from sfc.bench.measure import kernel_kind
    from sfc.bench.report import gpu_time_table

    names = {
        "sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nchw_tilesize128x128x32": "conv",
        "cutlass__5x_cudnn::Kernel<cutlass_tensorop_s1688wgrad_optimized_tf32>": "conv",
        "void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1>": "batchnorm",
        "void at::native::batch_norm_backward_reduce_channels_last_kernel<4, c10::BFloat16>":
            "batchnorm",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<float, float, float, false>": "layout",
        "sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize64x64x32": "gemm",
        "void at::native::(anonymous namespace)::grid_sampler_2d_kernel<float, int>":
            "grid_sample",
        "triton_poi_fused_add_relu_0": "fused",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "reduction",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>":
            "elementwise",
        "Memcpy HtoD (Pageable -> Device)": "copy",
        "void at::native::upsample_bilinear2d_out_frame<float, float>": "other",
    }
    assert {n: kernel_kind(n) for n in names} == names
    row = {"kind": "segnet", "precision": "fp32", "check_every": 50,
           "counts": {"wall_ms": 50.0, "gpu_ms": 40.0,
                      "gpu_ms_by_kind": {"conv": 30.0, "batchnorm": 10.0}}}
    table = gpu_time_table([row, {"kind": "sfm", "precision": "fp32", "counts": None}])
    assert "| segnet | fp32 checks/50 | 50.0 | 40.0 (80 %) | 30.0 | 10.0 |" in table
    assert "sfm" not in table and gpu_time_table([]) == ""


def test_pipeline_from_the_fastest_row_of_several_runs(tmp_path):
    """`--pipeline-from`: per stage kind the fastest step of all files (its configuration
    named), evaluation from the fastest row that measured it; hours by hand."""
    from sfc.bench.cli import fastest_pipeline
    from sfc.bench.measure import PIPELINE

    def row(kind, step, ev, prec="fp32", **kw):
        return {"kind": kind, "step_s": step, "eval_s_per_image": ev, "precision": prec, **kw}

    a = [row(k, 0.2, 0.05) for k in steps.KINDS]
    b = [row("segnet_sfc", 0.1, None, "bf16", compile="default"), row("sfm", 0.3, 0.01)]
    (tmp_path / "a.json").write_text(json.dumps({"stages": a}))
    (tmp_path / "b.json").write_text(json.dumps({"stages": b}))
    out = fastest_pipeline({"stages": []}, [tmp_path / "a.json", tmp_path / "b.json",
                                            tmp_path / "missing.json"])
    assert out["configs"]["segnet_sfc"] == "bf16 compile=default"
    assert out["configs"]["sfm"] == "fp32"
    step = {k: 0.2 for k in steps.KINDS} | {"segnet_sfc": 0.1}
    ev = {k: 0.05 for k in steps.KINDS} | {"sfm": 0.01}
    want = sum(step[kind] * iters / 3600 + ev[kind] * -(-iters // every) * n / 3600
               for _, kind, iters, every, n in PIPELINE)
    assert out["total_h"] == pytest.approx(want, rel=1e-12)


def test_pipeline_takes_pairs_side_by_side_where_faster():
    """A row of 2 processes side by side counts for the paired kinds only (segnet, segnet_sfc:
    update and reference), each run charged half the pair's time, and only where that beats
    the single-process row; an emulated graph row not at all; hours by hand."""
    from sfc.bench.cli import fastest_pipeline
    from sfc.bench.measure import PAIRED_KINDS

    assert PAIRED_KINDS == ("segnet", "segnet_sfc")

    def row(kind, step, **kw):
        return {"kind": kind, "step_s": step, "eval_s_per_image": None, "precision": "fp32",
                **kw}

    rows = [row(k, 0.2) for k in steps.KINDS] + [
        row("segnet", 0.3, side_by_side=2),  # pair 0.3 s per iteration: 0.15 per run < 0.2
        row("segnet_sfc", 0.5, side_by_side=2),  # 0.25 per run: slower than one at a time
        row("segnet_sfc", 0.38, side_by_side=2, side_by_side_mode="streams",
            cuda_graph=True),  # two graphs on streams in one process: 0.19 per run < 0.2
        row("accel", 0.01, side_by_side=2),  # not a paired kind: ignored
        row("segnet", 0.01, side_by_side=3),  # 3 at once: no pipeline use
        row("accel", 0.001, cuda_graph="emulated"),  # the CPU's emulated graph: no timing
    ]
    out = fastest_pipeline({"stages": rows}, [])
    assert out["configs"]["segnet"] == "fp32 ×2 side by side (each run: half the pair's)"
    assert out["configs"]["segnet_sfc"] == ("fp32 graph ×2 side by side (streams) (each run: "
                                            "half the pair's)")
    assert out["configs"]["accel"] == "fp32"
    want = (2 * 80_000 * 0.15 + 80_000 * 0.2 + 80_000 * 0.2 + 2 * 120_000 * 0.19
            + 160_000 * 0.2) / 3600
    assert out["total_train_h"] == pytest.approx(want, rel=1e-12)


def test_side_by_side_processes_each_report_their_steps(tmp_path):
    """`--side-by-side 2`: two spawned processes time the same stage kind after a common
    barrier; the row holds both medians and the slower one as its step."""
    path = tmp_path / "b.json"
    assert bench_main(["--device", "cpu", "--size", "64", "32", "--layers", "1", "1", "1", "1",
                       "--width", "8", "--iters", "2", "--warmup", "1", "--eval-images", "0",
                       "--no-flops", "--threads", "1", "--stages", "segnet",
                       "--side-by-side", "2", "--json", str(path)]) == 0
    single, pair = json.loads(path.read_text())["stages"]
    assert "side_by_side" not in single and pair["side_by_side"] == 2
    assert len(pair["step_s_each"]) == 2 and all(t > 0 for t in pair["step_s_each"])
    assert pair["step_s"] == max(pair["step_s_each"])
    assert [len(t) for t in pair["step_times_s"]] == [2, 2]


def test_side_by_side_on_streams_follows_the_graph_rows_only(tmp_path, capsys):
    """`--side-by-side 2 --side-by-side-mode both --cuda-graph both`: the eager row gets the
    processes row only, the graph row (emulated on the CPU) processes and streams; the streams
    row times run 0 alone in the same process and the pair; it needs --cuda-graph."""
    common = ["--device", "cpu", "--size", "64", "32", "--layers", "1", "1", "1", "1",
              "--width", "8", "--iters", "2", "--warmup", "1", "--eval-images", "0",
              "--no-flops", "--threads", "1", "--stages", "segnet", "--check-every", "5",
              "--side-by-side", "2"]
    with pytest.raises(SystemExit, match="streams replays CUDA graphs: add --cuda-graph"):
        bench_main([*common, "--side-by-side-mode", "streams"])
    path = tmp_path / "b.json"
    assert bench_main([*common, "--side-by-side-mode", "both", "--cuda-graph", "both",
                       "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["stages"]
    assert [(r["cuda_graph"], r.get("side_by_side"), r.get("side_by_side_mode"))
            for r in rows] == [(False, None, None), (False, 2, "processes"),
                               ("emulated", None, None), ("emulated", 2, "streams"),
                               ("emulated", 2, "processes")]
    s = rows[3]
    assert s["step_s"] == s["step_s_each"][0] == s["step_s_each"][1] > 0
    assert s["step_s_alone"] > 0 and len(s["step_times_alone_s"]) == 2
    assert s["capture_s"] > 0 and math.isfinite(s["loss_terms"]["seg"])
    assert "segnet fp32 graph ×2 (streams):" in capsys.readouterr().out


def test_processes_under_mps_are_detected_and_labelled(tmp_path, monkeypatch):
    from sfc.bench.measure import mps_running

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "pipe"))
    assert not mps_running()
    (tmp_path / "pipe").mkdir()
    assert mps_running()
    row = {"kind": "segnet_sfc", "precision": "fp32", "step_s": 0.1, "cuda_graph": True,
           "check_every": 50, "side_by_side": 2, "side_by_side_mode": "processes", "mps": True}
    assert report.config_label(row) == "fp32 checks/50 graph ×2 side by side (MPS)"
    alone = {**row, "side_by_side": None, "side_by_side_mode": None, "mps": False,
             "step_s": 0.08}
    line = report.comparison_table([alone, row]).splitlines()[2]
    assert line.startswith("| segnet_sfc | fp32 (processes under MPS) |") and "1.60×" in line


def test_a_failed_row_is_reported_and_the_others_still_measured(tmp_path, monkeypatch, capsys):
    """A row that raises (here every --cuda-graph runner, as a failed capture would) is logged
    with its error and kept in "errors"; the rows after it are measured; exit status 1."""
    def broken(kind, stage, bc):
        if bc.cuda_graph and kind != "sfm":
            raise RuntimeError("capture failed")
        return None

    monkeypatch.setattr(steps, "graph_runner", broken)
    path = tmp_path / "b.json"
    rc = bench_main(["--device", "cpu", "--size", "64", "32", "--layers", "1", "1", "1", "1",
                     "--width", "8", "--iters", "1", "--warmup", "0", "--eval-images", "0",
                     "--no-flops", "--threads", "1", "--stages", "segnet", "sfm",
                     "--check-every", "5", "--cuda-graph", "both", "--json", str(path)])
    assert rc == 1
    res = json.loads(path.read_text())
    assert [(r["kind"], r["cuda_graph"]) for r in res["stages"]] == [("segnet", False),
                                                                      ("sfm", False)]
    assert res["errors"] == [{"row": "segnet fp32 graph", "error": "RuntimeError: capture failed"}]
    captured = capsys.readouterr()
    assert "segnet fp32 graph: FAILED: RuntimeError: capture failed" in captured.out
    assert "* segnet fp32 graph: RuntimeError: capture failed" in captured.out


def test_side_by_side_reports_a_process_that_failed(tmp_path):
    """A process that fails (here: an invalid thread count, before the barrier) is named with
    its error, and the other is released from the barrier instead of waiting for it."""
    from sfc.bench.run import measure_side_by_side

    bc = steps.BenchConfig(source_size=(64, 32), target_size=(64, 32), **TINY)
    with pytest.raises(RuntimeError, match=r"side-by-side segnet: process 0: .*set_num_threads"):
        measure_side_by_side("segnet", bc, 2, 1, 0, tmp_path,
                             {"cudnn_benchmark": False, "aspp_impl": "auto", "threads": -5})


def test_comparison_table_by_hand():
    """Graph against eager, and a pair alone against side by side (2 × alone / the pair's
    step), from rows of one run; kinds with nothing to compare are left out."""
    def row(kind, step, graph=False, side=None, **kw):
        return {"kind": kind, "precision": "fp32", "step_s": step, "cuda_graph": graph,
                "side_by_side": side, **kw}

    streams = row("segnet_sfc", 0.090, True, 2, side_by_side_mode="streams",
                  step_s_alone=0.072)  # 2 × 72 ms alone / 90 ms for both: 1.60×
    table = report.comparison_table([
        row("segnet_sfc", 0.150), row("segnet_sfc", 0.200, side=2),
        row("segnet_sfc", 0.075, True), row("segnet_sfc", 0.100, True, 2), streams,
        row("sfm", 0.020), row("accel", 0.060), row("accel", 0.040, True)])
    lines = table.splitlines()
    assert len(lines) == 4  # header, rule, segnet_sfc, accel
    assert lines[2] == ("| segnet_sfc | fp32 | 150.0 | 75.0 | 2.00× | 200.0 | 1.50× | 100.0 "
                        "| 1.50× | 90.0 | 1.60× |")
    assert lines[3] == "| accel | fp32 | 60.0 | 40.0 | 1.50× | — | — | — | — | — | — |"
    assert report.comparison_table([row("sfm", 0.02)]) == ""
    assert report.config_label(streams) == "fp32 graph ×2 side by side (streams)"


def test_gpu_bench_script_fits_its_eight_minutes():
    """scripts/gpu_bench.sh: every part under a limit of its own, each limit used by exactly one
    part, and the GPU limits summing to at most 480 s (issue 18: ≤ 8 minutes)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "scripts" / "gpu_bench.sh").read_text()
    gpu, dry = (list(map(int, m.split()))
                for m in re.findall(r"^\s*T=\(([\d ]+)\)", text, flags=re.M)[::-1])
    parts = re.findall(r'^\s*part (\w+) "\$\{T\[(\d)\]\}"', text, flags=re.M)
    by_limit = {}
    for name, i in parts:  # the CUDA tests: one part in two forms (pytest there or not)
        by_limit.setdefault(int(i), set()).add(name)
    assert sorted(by_limit) == list(range(len(gpu))) == list(range(len(dry)))
    assert all(len(names) == 1 for names in by_limit.values()), by_limit
    assert len(gpu) == 8
    assert sum(gpu) <= 480
