"""Render BENCHMARKS.md (and its plots) from bench/results/*.json. Every number in BENCHMARKS.md comes from
those files, which the other bench scripts write; nothing is typed in by hand.

    python bench/report.py
"""

from __future__ import annotations

from common import GRID_TOKENS, RESULTS, ROOT, load_result

OUT = ROOT / "BENCHMARKS.md"
_GRID_NAMES = ("W", "G", "C", "W+G", "W+C", "G+C", "W+G+C (1/3 each)", "0.1W+0.3G+0.6C", "0.2G+0.8C",
               "0.1W+0.1G+0.8C")


def _fmt_ppl(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def baseline_section(b: dict) -> list[str]:
    lines = ["## Dense baseline (SmolLM2-135M-Instruct, `bench/baseline.py`)", ""]
    w, p = b["wikitext2_ppl128"], b.get("ptb_ppl128")
    lines += ["| metric | value |", "|---|---|",
              f"| parameters | {b['params']['total']:,} |",
              f"| WikiText-2 raw test PPL, seq 128, all {w['windows']} windows ({w['tokens_scored']:,} tokens) "
              f"| {w['ppl']:.3f} |"]
    if p:
        lines.append(f"| PTB valid PPL, seq 128, all {p['windows']} windows | {p['ppl']:.3f} |")
    z = b.get("zeroshot")
    if z:
        lines += ["", "Zero-shot accuracy (lm-eval conventions, log-likelihood of each choice"
                  + (f", first {z['limit']} examples per task" if z.get("limit") else ", full sets") + "):", "",
                  "| task | n | acc | acc_norm |", "|---|---|---|---|"]
        for name, v in z["tasks"].items():
            lines.append(f"| {name} | {v['n']} | {v['acc']:.4f} | {v['acc_norm']:.4f} |")
        lines.append(f"| **average** | | **{z['average']['acc']:.4f}** | **{z['average']['acc_norm']:.4f}** |")
    lines += ["", f"Versions: {', '.join(f'{k} {v}' for k, v in b['versions'].items())}. Measured {b['date']}.", ""]
    return lines


def scorers_section(s: dict, baseline: dict | None) -> list[str]:
    runs = s["runs"]
    ratios = [r["ratio"] for r in next(iter(runs.values()))["rows"]]
    tokens = s.get("tokens", GRID_TOKENS)
    lines = ["## Scorers at uniform pruning (`bench/scorers.py`)", "",
             f"Uniform allocation (every layer loses the same share of its parameters; attention in whole KV "
             f"groups, the MLP absorbs the rounding), calibration: 64 x 128 tokens of WikiText-2 *valid*. "
             f"PPL: WikiText-2 raw *test*, seq 128, the same first {tokens:,} tokens for every row"
             + (f" (dense on these tokens: {_fmt_ppl(baseline['grid_ppl'])})" if baseline and
                baseline.get("grid_ppl") else "") + ".", "",
             "| scorer | " + " | ".join(f"PPL @ {r:.0%}" for r in ratios) + " | scoring s* | peak RSS MiB |",
             "|---|" + "---|" * (len(ratios) + 2)]
    for name, run in runs.items():
        cells = " | ".join(_fmt_ppl(r["ppl"]) for r in run["rows"])
        w = run.get("described", {})
        if "alpha" in w:
            name = f"{name} ({w['alpha']:g}, {w['beta']:g}, {w['gamma']:g})"
        lines.append(f"| {name} | {cells} | {run['scoring_seconds']:.0f} | {run['peak_rss_mib']:.0f} |")
    lines += ["", "\\* wall time of scoring 64 x 128 calibration tokens, including the gradient pass where the scorer "
              "needs one; these runs shared the 2 cores with other jobs, so the times are upper bounds. Peak RSS "
              "is the scoring process's maximum resident memory (model, gradients, one layer's activations).", "",
              "![PPL vs ratio per scorer](bench/scorers.png)", ""]
    _plot_ppl({name: [(r["ratio"], r["ppl"]) for r in run["rows"]] for name, run in runs.items()},
              ROOT / "bench" / "scorers.png", (baseline or {}).get("grid_ppl"),
              "Uniform structured pruning of SmolLM2-135M")
    return lines


def piem_terms_section(t: dict) -> list[str]:
    rows = t["rows"]
    ratios = list(next(iter(rows.values()))["ppl"])
    lines = ["## PIEM terms and default weights (`bench/piem_terms.py`)", "",
             "W = weight term, G = gradient term, C = contextual term (see README); weights (alpha, beta, gamma). "
             f"Uniform allocation, no refit; PPL on the first {t['tokens']:,} WikiText-2 raw test tokens (seq 128, "
             f"the same windows in every row); the three terms are computed once ({t['scoring_seconds']:.0f} s, "
             f"on a shared CPU) and recombined per row.", "",
             "| terms | (alpha, beta, gamma) | " + " | ".join(f"PPL @ {float(r):.0%}" for r in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    best = min(rows, key=lambda k: sum(rows[k]["ppl"].values()))
    for name, row in rows.items():
        w = ", ".join(f"{x:g}" for x in row["weights"])
        cells = " | ".join(_fmt_ppl(row["ppl"][r]) for r in ratios)
        lines.append(f"| {'**' + name + '**' if name == best else name} | ({w}) | {cells} |")
    from edgeprune.scoring.scorers import PIEMScorer

    d = PIEMScorer()
    default = f"({d.alpha:g}, {d.beta:g}, {d.gamma:g})"
    lines += ["", f"Lowest summed PPL among these rows: **{best}**. PIEM's default weights are {default}."
              + (" Rows of the full grid (pairs, triples) not yet measured: "
                 + ", ".join(k for k in _GRID_NAMES if k not in rows) + "." if set(_GRID_NAMES) - set(rows) else ""),
              ""]
    return lines


TARGET_METHOD = "PIEM+LSPS multi-round"


def _fmt_weights(w) -> str:
    return "(" + ", ".join(f"{x:g}" for x in w) + ")"


def _row_weights(a: dict, row: dict) -> list[float] | None:
    """The PIEM weights a PIEM row was measured with: its own record, else the file's legacy weights (rows saved
    before rows recorded theirs)."""
    if row.get("piem_weights"):
        return row["piem_weights"]
    if row["method"].startswith("PIEM"):
        return a.get("legacy_piem_weights") or a.get("piem_weights")
    return None


def _shipped_weights() -> list[float]:
    from ablate import shipped_piem_weights

    return shipped_piem_weights()


def _piem_weights_note(a: dict) -> str:
    shipped = _shipped_weights()
    old = {tuple(w) for r in a["rows"].values() if (w := _row_weights(a, r)) and list(w) != shipped}
    note = f"PIEM rows use the weights PIEM ships with, (alpha, beta, gamma) = {_fmt_weights(shipped)}"
    if old:
        note += (", except the cells marked † (measured before the default changed, with "
                 + " or ".join(_fmt_weights(w) for w in sorted(old)) + ")")
    return note
TARGET_FACTOR = 1.25


def _recovered(rows: dict, method: str) -> bool:
    return any(r.get("recovery") for r in rows.values() if r["method"] == method)


def _speed_pass(rows: dict) -> bool:
    """Whether a --speed pass timed these rows: then a row pruned after it, whose layer shapes no timed row has,
    shows a dash rather than its timing taken during pruning, which is not comparable with the pass."""
    return any(r.get("decode_measured") for r in rows.values())


def _speed_note(rows: dict) -> str:
    if not _speed_pass(rows):
        return ("decode = greedy tokens/s of the PyTorch model on this CPU (batch 1), measured right after pruning "
                "while other jobs shared the 2 cores: compare within a column only")
    untimed = sum(1 for r in rows.values() if not r.get("decode_measured"))
    return ((f"decode of the {untimed} rows pruned after the last speed pass, whose layer shapes no timed row has: "
             "a dash (their timings during pruning, under other jobs, are not comparable; `python ablate.py --speed` "
             "on a quiet machine times them); for the others, " if untimed else "")
            + "decode = greedy tokens/s at batch 1 of a model with each row's layer shapes (PyTorch, this CPU), "
            f"measured for {'these' if untimed else 'all'} rows one after another by `python ablate.py --speed` "
            "(3 repeats, medians; decode "
            "speed depends on the shapes, not the weights). Eager PyTorch at batch 1 is bound by per-operator "
            "overhead more than by weight size and this shared machine's speed drifts between rows, so these "
            f"columns are rough{_speed_spread(rows)}; the exported runtimes' speeds are in the on-device profile "
            "below")


def _speed_spread(rows: dict) -> str:
    """How far apart two timings of the same layer shapes landed: the speed columns' own error bar."""
    import json

    timed: dict[str, set[float]] = {}
    for r in rows.values():
        if r.get("decode_measured") and r.get("layer_shapes"):
            timed.setdefault(json.dumps(r["layer_shapes"]), set()).add(round(r["decode_tok_s"], 3))
    spread = max((max(v) / min(v) - 1 for v in timed.values() if len(v) > 1), default=None)
    return "" if spread is None else (f" (rows with identical layer shapes, timed separately, differ by up to "
                                      f"{100 * spread:.0f}%)")


def _lr_rule(recovery: dict) -> str:
    """The learning-rate rule of a recovery record: records made before edgeprune.recover.LR_RULES lack it."""
    return recovery["config"].get("lr_rule", "absolute")


def _recovery_note(rows: dict) -> str:
    recs = [r["recovery"] for r in rows.values() if r.get("recovery")]
    if not recs:
        return ""
    rec, minutes = recs[0], sorted(r["seconds"] / 60 for r in recs)
    c = rec["config"]
    rules = sorted({(r["config"]["lr"], _lr_rule(r)) for r in recs}, key=lambda x: x[1] != "rms")
    lr = " or ".join(f"peak lr {x:g} relative to each tensor's RMS" if rule == "rms" else
                     f"peak lr {x:g} for every tensor (‡: the absolute rule before the RMS-relative default)"
                     for x, rule in rules)
    span = (f"{minutes[0]:.0f}" if round(minutes[0]) == round(minutes[-1])
            else f"{minutes[0]:.0f}-{minutes[-1]:.0f}")
    return (f"Recovery (`--recover-steps`): distillation from the dense model (KL to its next-token distribution, "
            f"edgeprune/recover.py), {c['steps']} steps x {c['batch_size']} windows x 128 tokens "
            f"({rec['tokens']:,} tokens) of WikiText-2 *valid*, AdamW, {lr}, every decoder weight "
            f"trained, embeddings frozen; {span} min of distillation wall time per row "
            "on this 2-core CPU (the longer ones shared it with another job). The same budget for every row of "
            "this table, baselines included, so it compares like with like.")


def _method_row(m: str, ratios: list[float], cell) -> str:
    return (f"| {m} | " + " | ".join(cell(m, r, "ppl", _fmt_ppl) for r in ratios) + " | "
            + " | ".join(cell(m, r, "zeroshot_avg_acc", lambda v: f"{v:.3f}") for r in ratios) + " | "
            + " | ".join(cell(m, r, "params", lambda v: f"{v / 1e6:.1f}") for r in ratios) + " | "
            + " | ".join(cell(m, r, "decode_tok_s", lambda v: f"{v:.1f}") for r in ratios) + " |")


MODEL_LABELS = {"default": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M"}


def ablation_section(a: dict) -> list[str]:
    """One model's ablation grid (bench/results/ablation.json: the default model; ablation-MODEL.json: others)."""
    from ablate import result_name

    model = a.get("model", "default")
    label = MODEL_LABELS.get(model, model)
    stem = result_name(model)  # the plot is named after the results file
    rows = a["rows"]
    dense = rows.get("dense@0")
    ratios = sorted({r["ratio"] for r in rows.values() if r["ratio"] > 0})
    methods = list(dict.fromkeys(r["method"] for r in rows.values() if r["ratio"] > 0))
    groups = {"Without retraining": [m for m in methods if not _recovered(rows, m)],
              "With recovery (distillation from the dense model)": [m for m in methods if _recovered(rows, m)]}
    # zero-shot columns compare like with like: only rows measured on the dense row's examples
    limit = (dense or {}).get("zeroshot_limit") if (dense or {}).get("zeroshot_avg_acc") is not None else None
    shipped = _shipped_weights()
    timed = _speed_pass(rows)

    def old(row: dict) -> str:
        """† on a PIEM row measured with other weights than the shipped ones; ‡ on a row recovered with the
        absolute learning rate of before the RMS-relative default."""
        dagger = "†" if (w := _row_weights(a, row)) and list(w) != shipped else ""
        return dagger + ("‡" if row.get("recovery") and _lr_rule(row["recovery"]) != "rms" else "")

    pruned = [r for r in rows.values() if r["ratio"] > 0]
    covered = sum(1 for r in pruned if limit and r.get("zeroshot_limit") == limit and "zeroshot_avg_acc" in r)
    lines = [f"## Ablation on {label}: scorers x allocators x rounds x recovery (`bench/ablate.py"
             + ("" if model == "default" else f" --model {model}") + "`)", "",
             f"Each row pruned from the dense model with WikiText-2 valid calibration (64 windows of 128 tokens); "
             f"PPL on the first {a['tokens']:,} WikiText-2 test tokens (seq 128, the same windows in every row); "
             f"zero-shot = mean acc over PIQA, ARC-e, ARC-c, BoolQ, OpenBookQA"
             + (f", first {limit} examples per task ({5 * limit} in all; CPU time limits it), measured for "
                f"{covered} of the {len(pruned)} pruned rows; one standard error of such an average is up to "
                f"{100 * (0.25 / (5 * limit)) ** 0.5:.1f} points, so smaller differences are noise" if limit else "")
             + f"; {_speed_note(rows)}. `refit` = least-squares reconstruction "
             f"(README, Reconstruction). {_piem_weights_note(a)}; LSPS rows use Block Influence sensitivity, tau 1; methods that name no refit "
             "and no recovery run as published. A dash: not measured.", ""]
    head = "| method | " + " | ".join(f"PPL @ {r:.0%}" for r in ratios) + " | " + \
        " | ".join(f"zero-shot @ {r:.0%}" for r in ratios) + " | " + " | ".join(f"params @ {r:.0%} (M)" for r in ratios) \
        + " | " + " | ".join(f"decode tok/s @ {r:.0%}" for r in ratios) + " |"
    for title, members in groups.items():
        if not members:
            continue
        group = {k: v for k, v in rows.items() if v["method"] in members}
        best = {r: min((x for x in group.values() if x["ratio"] == r), key=lambda x: x["ppl"])["method"]
                for r in ratios if any(x["ratio"] == r for x in group.values())}

        def cell(m, r, key, fmt, best=best):
            row = rows.get(f"{m}@{r:g}")
            if row is None or row.get(key) is None or (key == "zeroshot_avg_acc" and row.get("zeroshot_limit") != limit):
                return "–"
            if key == "decode_tok_s" and timed and not row.get("decode_measured"):
                return "–"
            text = fmt(row[key])
            if key in ("ppl", "zeroshot_avg_acc"):
                text += old(row)
            return f"**{text}**" if key == "ppl" and best.get(r) == m else text

        lines += [f"### {title}", ""]
        if _recovered(rows, members[0]):
            lines += [_recovery_note(rows), ""]
        lines += [head, "|---|" + "---|" * (4 * len(ratios))]
        if dense:
            z = dense.get("zeroshot_avg_acc")
            lines.append("| dense | " + " | ".join(_fmt_ppl(dense["ppl"]) for _ in ratios) + " | "
                         + " | ".join("" if z is None else f"{z:.3f}" for _ in ratios) + " | "
                         + " | ".join(f"{dense['params'] / 1e6:.1f}" for _ in ratios) + " | "
                         + " | ".join(f"{dense['decode_tok_s']:.1f}" for _ in ratios) + " |")
        lines += [_method_row(m, ratios, cell) for m in members]
        lines += ["", "Lowest PPL per ratio in this table in bold.", ""] + _target_lines(group, dense, ratios, old)
        if _recovered(rows, members[0]):
            for r in best:  # the ratios this table has rows at
                lines += _missing_recovery(rows, groups["Without retraining"], r)
    lines += _zeroshot_tasks(rows, dense, limit, 0.2, boolq_note=model == "default")
    _plot_ppl({m: [(r, rows[f"{m}@{r:g}"]["ppl"]) for r in ratios if f"{m}@{r:g}" in rows] for m in methods},
              ROOT / "bench" / f"{stem}.png", dense["ppl"] if dense else None, f"Ablation on {label}",
              size=(7.5, 5), legend_size=6.5, bold="PIEM+LSPS", dotted="distillation")
    lines += [f"![PPL vs ratio per method on {label}](bench/{stem}.png)", ""]
    return lines


def _missing_recovery(rows: dict, plain: list[str], ratio: float) -> list[str]:
    """Name the methods that have no recovered row at ``ratio``, so "lowest" above is read against what ran."""
    from ablate import DISTILL

    missing = [m for m in plain if f"{m}{DISTILL}@{ratio:g}" not in rows]
    return [f"Not distilled at {ratio:.0%} (CPU time): {', '.join(missing)}; the comparison above covers the "
            "recovered rows only.", ""] if missing else []


def _zeroshot_tasks(rows: dict, dense: dict | None, limit: int | None, ratio: float,
                    boolq_note: bool = True) -> list[str]:
    """Per-task accuracy of the rows measured on the dense row's examples at ``ratio``: the average hides that
    BoolQ swings far more than the other four tasks at this model size."""
    have = [r for r in rows.values() if r.get("zeroshot") and r.get("zeroshot_limit") == limit
            and r["ratio"] in (0, ratio)]
    if not limit or len(have) < 2:
        return []
    tasks = list(dense["zeroshot"])
    lines = [f"#### Zero-shot accuracy per task at {ratio:.0%} (first {limit} examples per task)", "",
             "| method | " + " | ".join(tasks) + " | average | average without boolq |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for r in sorted(have, key=lambda r: r["ratio"]):
        z = r["zeroshot"]
        rest = [z[t] for t in tasks if t != "boolq"]
        lines.append(f"| {r['method']} | " + " | ".join(f"{z[t]:.2f}" for t in tasks)
                     + f" | {sum(z.values()) / len(z):.3f} | {sum(rest) / len(rest):.3f} |")
    if not boolq_note:
        return lines + [""]
    return lines + ["", "BoolQ is a yes/no task; the dense model answers \"no\" to most of these examples while most "
                    "of their answers are \"yes\", and a pruned model that leans the other way gains up to 50 points "
                    "there without knowing more, which lifts its average above the dense one. The average without "
                    "BoolQ is the fairer comparison.", ""]


def _target_lines(rows: dict, dense: dict | None, ratios: list[float], mark=lambda row: "") -> list[str]:
    """The issue's target, checked against the numbers: the multi-round method has the lowest PPL of every row at
    20% and 30%, and at 20% at most 1.25x the dense PPL. ``mark(row)``: the suffix of a row's PPL (†: measured
    with other PIEM weights than the shipped ones)."""
    out = ["**Target check** (computed from the rows of this table"
           + ("; † as in the table: a comparison of a † value with an unmarked one mixes two PIEM weightings"
              if any("†" in mark(x) for x in rows.values()) else "")
           + ("; ‡ as in the table: recovered with the earlier absolute learning rate"
              if any("‡" in mark(x) for x in rows.values()) else "") + "):", ""]
    for r in (0.2, 0.3):
        if r not in ratios:
            continue
        ours = [x for x in rows.values() if x["ratio"] == r and x["method"].startswith(TARGET_METHOD)
                and "without" not in x["method"]]
        others = [x for x in rows.values() if x["ratio"] == r and x not in ours]
        if not ours or not others:
            continue
        o = min(ours, key=lambda x: x["ppl"])
        rival = min(others, key=lambda x: x["ppl"])
        verdict = "lowest" if o["ppl"] < rival["ppl"] else "NOT lowest"
        out.append(f"- {r:.0%}: {o['method']} PPL {o['ppl']:.2f}{mark(o)} is {verdict}; next best {rival['method']} "
                   f"{rival['ppl']:.2f}{mark(rival)} (margin {100 * (rival['ppl'] / o['ppl'] - 1):+.1f}%).")
        one = [x for x in rows.values() if x["ratio"] == r and x["method"].startswith("PIEM+LSPS one-shot")]
        for x in sorted(ours, key=lambda x: x["method"]) if one else []:
            out.append(f"- {r:.0%}: {x['method']} vs {one[0]['method']} (same final size): {x['ppl']:.2f}{mark(x)} "
                       f"vs {one[0]['ppl']:.2f}{mark(one[0])} ({100 * (x['ppl'] / one[0]['ppl'] - 1):+.1f}%).")
        if dense and r == 0.2:
            f = o["ppl"] / dense["ppl"]
            out.append(f"- {r:.0%}: {f:.2f}x{mark(o)} the dense PPL ({dense['ppl']:.2f}); target <= {TARGET_FACTOR}x: "
                       + (f"met ({100 * (1 - f / TARGET_FACTOR):.0f}% under)." if f <= TARGET_FACTOR else f"missed by {100 * (f / TARGET_FACTOR - 1):.0f}%."))
    return out + [""] if len(out) > 2 else []  # nothing to compare yet: no heading either


TIED_ONNX_SINCE = "2026-12-04T23:00:00Z"  # export/onnx_weights.py and onnx_quant.py write a tied head's table once


def pipeline_runs_section(r: dict) -> list[str]:
    """bench/pipeline_runs.py's runs: one `edgeprune run` results table per run (the report's own table)."""
    from edgeprune.report_readme import readme_table

    lines = ["## Whole-pipeline runs (`bench/pipeline_runs.py`)", "",
             "Each run is `edgeprune run` through every stage (README, Pipeline); the table is the run report's "
             "results table (edgeprune/report_readme.py). Profiles ran on this shared 2-core host: the load "
             "average (1 min) at the start / end of each profile is listed under its table.", ""]
    for name, run in r["runs"].items():
        data = run["report"]
        lines += [f"### {name}", "", f"`{run['command']}`", "", readme_table(data).rstrip(), ""]
        lines += [f"Not exported, {a['variant']} {a['format'].upper()} {a['dtype']}: {a['skipped']}."
                  for a in data.get("artifacts", []) if a.get("skipped")]
        if (any(a.get("format") == "onnx" and not a.get("skipped") for a in data.get("artifacts", []))
                and str(data.get("generated", "")) < TIED_ONNX_SINCE):
            lines.append("The ONNX sizes of this run hold a tied lm_head's table twice (exported before "
                         f"{TIED_ONNX_SINCE}, when the exporter began writing it once: Gemma-3-270M int8 is "
                         "469 -> 289 MiB exported now; measured on SmolLM2, the resident memory stays within 15 MiB).")
        loads = run.get("profile_load") or {}
        if loads:
            lines.append("Load average during the profiles: " + "; ".join(
                f"{k} {a:.1f} / {b:.1f}" if b is not None else f"{k} {a:.1f}" for k, (a, b) in loads.items())
                + ".")
        lines.append("")
    return lines


def profile_section(p: dict) -> list[str]:
    """bench/device_profile.py's rows: the device profiler on this CPU, and pruned vs dense per format/dtype."""
    rows = {r["label"]: r for r in p["rows"]}
    s = p.get("settings", {})
    lines = ["## On-device profile, this CPU (`bench/device_profile.py`)", "",
             f"The torch-free device profiler (`edgeprune profile ARTIFACT --device {p.get('device', 'cpu')}`), "
             f"{next(iter(rows.values())).get('threads', '?')} threads, {s.get('repeats', '?')} repeats (medians), decode of "
             f"{s.get('new_tokens', '?')} tokens. Load averages at start/end of each row are listed: this 2-core "
             "machine was shared, so compare rows measured under similar load.", "",
             "| artifact | size MiB | load s | TTFT ms (128 tok) | decode tok/s | decode ms p50 / p95 | peak RSS MiB "
             "| load avg |", "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        ttft = r.get("ttft_ms", {})
        t128 = ttft.get("128", ttft.get(128)) if isinstance(ttft, dict) else None
        la = [x[0] for x in r.get("load_avg") or []]  # 1-minute load average at start and end
        lines.append(f"| {label} | {r['size_mb']:.1f} | {r['load_s']:.2f} | "
                     f"{'' if t128 is None else f'{t128:.0f}'} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_ms_p50']:.1f} / {r['decode_ms_p95']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{' / '.join(f'{x:.1f}' for x in la)} |")
    pairs = [(label, label.replace("pruned30-", "dense-", 1)) for label in rows if label.startswith("pruned30-")]
    pairs = [(a, b) for a, b in pairs if b in rows]
    if pairs:
        lines += ["", "Batch-1 decode reads every weight once per token, so its speedup should track the bytes "
                  "ratio (dense size / pruned size) where decode is memory-bound; on this shared 2-core machine a "
                  "few rows land above it, which is measurement noise (one run, 3 repeats):", "",
                  "| format | bytes ratio (dense/pruned) | decode speedup | TTFT speedup | peak RSS pruned/dense |", "|---|---|---|---|---|"]
        for a, b in pairs:
            pa, pb = rows[a], rows[b]
            ta, tb = (pa.get("ttft_ms") or {}).get("128"), (pb.get("ttft_ms") or {}).get("128")
            lines.append(f"| {a.removeprefix('pruned30-')} | {pb['size_mb'] / pa['size_mb']:.2f}x | "
                         f"{pa['decode_tokens_per_s'] / pb['decode_tokens_per_s']:.2f}x | "
                         f"{'' if not (ta and tb) else f'{tb / ta:.2f}x'} | "
                         f"{pa['peak_rss_mb'] / pb['peak_rss_mb']:.2f} |")
    return lines + [""]


def _plot_ppl(series: dict[str, list[tuple[float, float]]], path, dense: float | None, title: str,
              size=(6, 4), legend_size=8, bold: str | None = None, dotted: str | None = None) -> None:
    """PPL (log) vs % of decoder parameters removed, one line per series, the dense PPL as a dashed line. A
    ``dotted`` series (``"<method> + <dotted>"``) takes its method's colour, so the two read as one method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def method(name: str) -> str:
        return name.split(f" + {dotted}")[0] if dotted else name

    methods = list(dict.fromkeys(method(n) for n in series))
    tab20 = plt.get_cmap("tab20").colors
    colours = tab20[0::2] + tab20[1::2]  # the ten strong shades first: up to 20 methods stay apart
    fig, ax = plt.subplots(figsize=size)
    for name, pts in series.items():
        if pts:
            ax.plot([100 * r for r, _ in pts], [p for _, p in pts], marker="o", label=name,
                    color=colours[methods.index(method(name)) % len(colours)],
                    linewidth=2.5 if bold and name.startswith(bold) else 1.5,
                    linestyle=":" if dotted and dotted in name else "-")
    if dense:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("decoder parameters removed (%)")
    ax.set_ylabel("WikiText-2 PPL (seq 128)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fit_section(f: dict, short: dict | None = None) -> list[str]:
    """issue 17's benchmark: the table bench/fit.py rendered from its results, and its plot; ``short``: an
    earlier, complete run with a shortened recipe (fit_short.json), when there is one."""
    lines = ["## Fit: the least compression that meets the targets (`bench/fit.py`)", "",
            "`edgeprune fit` on this CPU with the default model (README, Fit): the targets are set from the dense q8_0 "
            "artifact measured at the start of the same run; each chosen configuration is pruned, exported, "
            "evaluated and profiled; the naive choice (one uniform ratio guessed from the bytes ratio) is pruned "
            "with the same recipe and measured too. Predicted = from the pruned checkpoint's layer shapes and the "
            "dtype, before export (speed scaled by the dense artifact's measured / predicted speed of this run). The "
            "search itself chose from predictions for uniform shapes at each ratio (LSPS then allocates unevenly); "
            "where the pruned model's own shapes cost more than those, a measurement missed and fit stepped once "
            "(rows marked stepped; each configuration's fit.json holds both predictions)." + (
                " The run was stopped before its end (deadline): the rows below are the targets it finished."
                if f.get("partial") else ""), "",
            f["table"].rstrip("\n"), "", "![measured PPL vs decode speed](bench/results/fit.png)", ""]
    if short and short.get("table"):
        lines += [f"An earlier complete run ({short['date']}) with a shortened recipe, both LSPS budgets "
                  "(`bench/results/fit_short.json`):", "", short["table"].rstrip("\n"), ""]
    return lines


def main() -> None:
    lines = ["# Benchmarks", "",
             "Generated by `python bench/report.py` from `bench/results/*.json`; rerun the bench scripts named "
             "in each section to reproduce. Machine: 2-core x86-64 CPU, no GPU.", ""]
    b = load_result("baseline")
    if b:
        lines += baseline_section(b)
    s = load_result("scorers")
    if s:
        lines += scorers_section(s, s.get("dense"))
    t = load_result("piem_terms")
    if t:
        lines += piem_terms_section(t)
    for name in ["ablation"] + sorted(p.stem for p in RESULTS.glob("ablation-*.json")):
        a = load_result(name)
        if a and a.get("rows"):
            lines += ablation_section(a)
    e = load_result("export")
    if e:
        from export_report import render

        lines += [render(e), ""]
    p = load_result("profile")
    if p:
        lines += profile_section(p)
    runs = load_result("pipeline_runs")
    if runs and runs.get("runs"):
        lines += pipeline_runs_section(runs)
    f = load_result("fit")
    if f and f.get("table"):
        lines += fit_section(f, load_result("fit_short"))
    sc = load_result("scale")
    if sc:
        from scale import scale_section

        lines += scale_section(sc)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
