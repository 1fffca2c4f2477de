"""Readable tables of a benchmark result (the JSON written by `python -m sfc.bench`)."""

from __future__ import annotations

from sfc.bench.measure import GIB


def _f(x, fmt: str, none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def _times(x) -> str:
    return _f(x, ".2f") + ("×" if x is not None else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def stage_table(stages: list[dict]) -> str:
    rows = []
    for r in stages:
        mem = r["peak_mem_bytes"] / GIB
        rows.append([r["kind"], config_label(r),
                     "{}×{} / {}×{}".format(*r["source_size"], *r["target_size"]),
                     _f(r["step_s"] * 1e3, ".1f"),
                     _f(r.get("opt_s") and r["opt_s"] * 1e3, ".1f")
                     + (" (foreach)" if r.get("foreach_sgd") else ""),
                     _f(r["flops_per_step"] and r["flops_per_step"] / 1e12, ".3f"),
                     _f(r["tflops_per_s"], ".2f"),
                     f"{mem:.2f} ({'CUDA' if r['peak_mem_kind'].startswith('cuda') else 'RSS'})",
                     eval_cell(r),
                     counts_cell(r.get("counts"))])
    return _table(["stage", "precision", "source / target (W×H)", "step ms (median)",
                   "of which optimiser ms", "TFLOP/step", "TFLOP/s", "peak mem GiB",
                   "eval ms/image", "kernels / launches / host syncs (sync ops)"], rows)


def comparison_table(stages: list[dict]) -> str:
    """Per stage kind and precision, the eager step against the graph step and each alone
    against 2 side by side (a pair's time: 2 × alone one after the other, the slower process's
    step side by side; on streams: 2 × run 0 alone in the same process against an iteration of
    both): the speed-ups the rows measured in this run. "" if there is nothing to compare."""
    def key(r):
        return (r["kind"], r["precision"], bool(r.get("channels_last")),
                r.get("compile", "none"), bool(r.get("stack_forwards")))

    def step(r):
        return r["step_s"] * 1e3

    groups: dict[tuple, dict] = {}
    for r in stages:
        g = groups.setdefault(key(r), {})
        side = r.get("side_by_side") or 1
        streams = r.get("side_by_side_mode") == "streams"
        g[(bool(r.get("cuda_graph")), side if not streams else f"{side} streams")] = r
    rows = []
    for (kind, prec, _, _, stack), g in groups.items():
        eager, graph = g.get((False, 1)), g.get((True, 1))
        pairs = [(g.get((gr, 1)), g.get((gr, 2)), gr) for gr in (False, True)]
        on_streams = g.get((True, "2 streams"))
        if not ((eager and graph) or any(a and b for a, b, _ in pairs) or on_streams):
            continue
        emulated = any(r.get("cuda_graph") == "emulated" for r in g.values())
        mps = any(r.get("mps") for r in g.values())
        cells = [kind, prec + (" stacked" if stack else "")
                 + (" (graph emulated: no timing)" if emulated else "")
                 + (" (processes under MPS)" if mps else ""),
                 _f(eager and step(eager), ".1f"), _f(graph and step(graph), ".1f"),
                 _times(eager and graph and eager["step_s"] / graph["step_s"])]
        for alone, pair, _ in pairs:
            cells += [_f(pair and step(pair), ".1f"),
                      _times(alone and pair and 2 * alone["step_s"] / pair["step_s"])]
        cells += [_f(on_streams and step(on_streams), ".1f"),
                  _times(on_streams and 2 * on_streams["step_s_alone"] / on_streams["step_s"])]
        rows.append(cells)
    if not rows:
        return ""
    return _table(["stage", "precision", "eager ms", "graph ms", "graph speed-up",
                   "eager, 2 side by side ms", "pair speed-up (eager)",
                   "graph, 2 side by side ms", "pair speed-up (graph)",
                   "graph, 2 on streams ms", "pair speed-up (streams)"], rows)


def stacked_table(stages: list[dict]) -> str:
    """`--stack-forwards`: per SFC stage kind and configuration, the step with the two target
    forwards one after the other against the same step with them stacked in one batch (rows of
    one process alone; the speed-up is plain / stacked). "" without such pairs."""
    def key(r):
        return (r["kind"], config_label({**r, "stack_forwards": False}))

    plain, stack = {}, {}
    for r in stages:
        if (r.get("side_by_side") or 1) == 1:
            (stack if r.get("stack_forwards") else plain)[key(r)] = r
    rows = [[kind, label, f"{plain[(kind, label)]['step_s'] * 1e3:.1f}",
             f"{r['step_s'] * 1e3:.1f}", _times(plain[(kind, label)]["step_s"] / r["step_s"])]
            + [counts_cell(x.get("counts")) for x in (plain[(kind, label)], r)]
            for (kind, label), r in stack.items() if (kind, label) in plain]
    if not rows:
        return ""
    return _table(["stage", "configuration", "target forwards apart ms", "stacked ms",
                   "speed-up", "counts apart", "counts stacked"], rows)


def eval_cell(r: dict) -> str:
    """Validation ms per image; batched (--eval-batch-size): with the batch-1 time beside."""
    ms = _f(r["eval_s_per_image"] and r["eval_s_per_image"] * 1e3, ".1f")
    b = r.get("eval_batch_size") or 1
    if b == 1 or r["eval_s_per_image"] is None:
        return ms
    one = r.get("eval_s_per_image_batch1")
    return f"{ms} (batch {b}; batch 1: {_f(one and one * 1e3, '.1f')})"


def config_label(r: dict) -> str:
    """precision, memory format, dilated convolutions, compile mode, check interval, graph and
    processes of one bench row."""
    return (r["precision"] + (" cl" if r.get("channels_last") else "")
            + (" s2b" if r.get("dilated_impl") == "s2b" else "")
            + (" stacked" if r.get("stack_forwards") else "")
            + (f" compile={r['compile']}" if r.get("compile", "none") != "none" else "")
            + (f" checks/{r['check_every']}" if r.get("check_every", 1) != 1 else "")
            + {True: " graph", "emulated": " graph (emulated)"}.get(r.get("cuda_graph"), "")
            + (f" ×{r['side_by_side']} side by side" if r.get("side_by_side") else "")
            + (" (streams)" if r.get("side_by_side_mode") == "streams" else "")
            + (" (MPS)" if r.get("mps") else ""))


def counts_cell(c: dict | None) -> str:
    """kernels / launches / host syncs (sync ops); on the CPU (no kernels) the profiler's aten
    ops of the iteration instead (nested calls counted too)."""
    if not c:
        return "—"
    if c.get("kernels") is None and c.get("aten_ops") is not None:
        return f"{c['aten_ops']:,} aten ops ({c['sync_ops']})"
    return (f"{_f(c.get('kernels'), 'd')} / {_f(c.get('launches'), 'd')} / "
            f"{_f(c.get('host_syncs'), 'd')} ({c['sync_ops']})")


def gpu_time_table(stages: list[dict]) -> str:
    """Where one profiled iteration's GPU time goes (rows whose counts have it)."""
    rows, kinds = [], []
    for r in stages:
        c = r.get("counts") or {}
        for k in c.get("gpu_ms_by_kind") or {}:
            if k not in kinds:
                kinds.append(k)
    for r in stages:
        c = r.get("counts") or {}
        if not c.get("gpu_ms_by_kind"):
            continue
        by = c["gpu_ms_by_kind"]
        rows.append([r["kind"], config_label(r), f"{c['wall_ms']:.1f}",
                     f"{c['gpu_ms']:.1f} ({100 * c['gpu_ms'] / c['wall_ms']:.0f} %)"]
                    + [_f(by.get(k), ".1f") for k in kinds])
    if not rows:
        return ""
    return _table(["stage", "precision", "profiled iteration ms", "kernels' sum ms (of it)"]
                  + [f"{k} ms" for k in kinds], rows)


def pipeline_table(pipelines: dict) -> str:
    out = []
    for prec, p in pipelines.items():
        if p.get("configs"):
            prec += " (per stage kind: " + ", ".join(f"{k} {v}" for k, v in
                                                     p["configs"].items()) + ")"
        rows = [[r["run"], r["kind"], f"{r['iters']:,}", _f(r["train_h"], ".2f"),
                 f"{r['evals']}×{r['val_images']}", _f(r["eval_h"], ".2f")] for r in p["runs"]]
        rows.append(["**total**", "", "", _f(p["total_train_h"], ".2f"), "",
                     "**" + _f(p["total_h"], ".2f") + " h incl. eval**"])
        out.append(f"Full pipeline, {prec}:\n\n" + _table(
            ["run", "kind", "iterations", "train h", "evaluations", "eval h"], rows))
    return "\n\n".join(out)


def reference_table(refs: list[dict]) -> str:
    rows = []
    for r in refs:
        mem = ""
        if r.get("project_step_extra_mem_bytes") is not None:
            mem = " / ".join(f"{r[k] / GIB:.2f}" for k in ("project_step_extra_mem_bytes",
                                                           "reference_step_extra_mem_bytes"))
        kind = r["kind"] + ("" if r.get("source_prev_forward", True) or r["kind"] == "sfm"
                            else " (project: --no-source-prev-forward)")
        rows.append([kind, config_label(r),
                     "{}×{} / {}×{}".format(*r["source_size"], *r["target_size"]),
                     _f(r["project_step_s"] * 1e3, ".1f"), _f(r["reference_step_s"] * 1e3, ".1f"),
                     _f(r["speedup"], ".2f") + "×",
                     _f(r.get("speedup_paired"), ".2f") + "×", f"{r['max_rel_loss_diff']:.1e}",
                     "yes" if r["losses_equal"] else "**NO**", mem or "—"])
    return _table(["stage", "precision", "source / target (W×H)", "project ms",
                   "release-style ms", "speed-up (medians)", "speed-up (paired median)",
                   "max rel loss diff",
                   f"equal (rtol {refs[0]['rtol']:g})" if refs else "equal",
                   "step extra mem GiB (project / release)"], rows)


def loader_table(lo: dict) -> str:
    rows = []
    multi = lo.get("samples_per_s_multi") or {}
    for name, rate in lo["samples_per_s_one_worker"].items():
        users = [k for k, v in lo["stage_loaders"].items() if name in v]
        need = ", ".join(f"{k} {lo['workers_needed'][k][name]}" for k in users
                         if k in lo["workers_needed"])
        rows.append([name, "{}×{}".format(*lo["sizes"][name]), f"{rate:.2f}",
                     _f(multi.get(name), ".2f"), need or "—"])
    k = multi.get("workers")
    return _table(["loader", "size (W×H)", "samples/s, 1 worker",
                   f"samples/s, {k} workers" if k else "samples/s, N workers",
                   "workers needed (stage n)"], rows)


def full_report(res: dict) -> str:
    m = res["meta"]
    host = f" — host {m['host_cpu']}" if m.get("host_cpu") and m.get("device") == "cuda" else ""
    parts = [f"sfc.bench — {m['date']} — {m['device_name']}{host} — torch {m['torch']} — "
             f"{m['threads']} threads — load average {m['loadavg']}"]
    if res.get("stages"):
        parts.append(stage_table(res["stages"]))
        gpu = gpu_time_table(res["stages"])
        if gpu:
            parts.append("GPU time of one profiled iteration by kernel kind "
                         "(`sfc.bench.measure.kernel_kind`):\n\n" + gpu)
        comp = comparison_table(res["stages"])
        if comp:
            parts.append("Speed-ups measured in this run (pair speed-up: two runs one after "
                         "the other against the two side by side):\n\n" + comp)
        stk = stacked_table(res["stages"])
        if stk:
            parts.append("The SFC term's two target forwards one after the other against "
                         "stacked in one batch (`--stack-forwards`):\n\n" + stk)
    if res.get("pipeline"):
        parts.append(pipeline_table(res["pipeline"]))
    if res.get("reference"):
        parts.append("Release-style reference vs project (lockstep, same batches):\n\n"
                     + reference_table(res["reference"]))
    if res.get("errors"):
        parts.append("Rows that failed (see the log for each traceback):\n\n" + "\n".join(
            f"* {e['row']}: {e['error']}" for e in res["errors"]))
    if res.get("loaders"):
        parts.append("Loaders (native-size synthetic files, faithful training sizes):\n\n"
                     + loader_table(res["loaders"]))
    return "\n\n".join(parts) + "\n"
