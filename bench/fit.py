"""`edgeprune fit` on this CPU with the default model (issue 17's benchmark). Writes bench/results/fit.json,
bench/results/fit.md (the table below) and bench/results/fit.png (PPL vs decode speed of every artifact measured,
with the Pareto frontier), and prints the table.

    python bench/fit.py [--data ../shared/data]           # the full recipe (two rounds, refit, 100 distillation steps)
    python bench/fit.py --set rounds=1 --set recover_steps=0   # a shorter recipe (say so when quoting it)
    python bench/fit.py --replot                          # table and plot again from bench/results/fit.json

In one run, back to back: the dense GGUF q8_0 artifact is profiled (its decode speed and peak RSS set the targets);
then `fit` runs for decode >= 1.3x and >= 1.6x the dense speed (with LSPS spending a parameter budget and a
latency budget) and for a memory cap 25 % under the dense peak RSS; for each speed target the naive choice a user
would make (one uniform ratio guessed from the bytes ratio: bytes / speedup) is pruned with the same recipe and
measured too; the dense artifact is profiled again at the end (the drift between the two dense measurements and
the load averages say how noisy the machine was). Checkpoints and artifacts are shared under --work, so a rerun
reuses them (profiles and PPL are measured again).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from common import ROOT, data_dir, save

from edgeprune.errors import EdgePruneError


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def naive_ratio(base, speedup: float, round_to: int) -> float:
    """The uniform ratio whose q8_0 file is 1/speedup of the dense file's bytes (what a user guesses from
    'decode speed follows the bytes')."""
    from edgeprune.fit.shapes import at_ratio, file_bytes

    want = file_bytes(base, "gguf", "q8_0") / speedup
    for i in range(1, 96):
        r = i / 100
        if file_bytes(at_ratio(base, r, round_to), "gguf", "q8_0") <= want:
            return r
    return 0.95


def row_of(name: str, budget: str, result: dict | None, error: str | None, dense: dict) -> dict:
    if result is None:
        return {"target": name, "budget": budget, "error": error}
    a = result["final"]
    p, m = a["predicted_from_shapes"], a["measured"]
    return {"target": name, "budget": budget, "ratio": a["ratio"], "dtype": a["dtype"],
            "stepped": bool(result["stepped"]), "met": result["met"], "missed": a["missed"],
            "pred_decode": p.get("decode_tok_s"), "decode": m["decode_tok_s"],
            "speedup": round(m["decode_tok_s"] / dense["decode_tok_s"], 3),
            "pred_memory": p["memory_mb"], "memory": m["memory_mb"], "ppl": m["ppl"], "ppl_ratio": m["ppl_ratio"],
            "load_avg": m["load_avg"], "artifact": a["artifact"]}


def fill_partial(res: dict) -> dict:
    """A run stopped before its end (fit.json is saved after every target): the prediction errors from its rows."""
    if "memory_errors" in res:
        return res
    res["partial"] = True
    rows = [r for r in res["rows"] if not r.get("error")]
    d = res["dense"]
    res["memory_errors"] = {"dense q8_0": round(d["predicted"]["memory_mb"] / d["peak_rss_mb"] - 1, 4)}
    res["memory_errors"].update({f"{r['target']} {r['budget']} {r['ratio']:.2f} {r['dtype']}":
                                 round(r["pred_memory"] / r["memory"] - 1, 4) for r in rows})
    res["latency_errors"] = {}
    for dtype in sorted({r["dtype"] for r in rows}):  # the fit's choices (the dense anchor's error is 0 by definition)
        real = [abs(r["pred_decode"] / r["decode"] - 1) for r in rows if r["dtype"] == dtype and r["pred_decode"]]
        res["latency_errors"][dtype] = {"table": "-", "held_out_mean": None, "held_out_max": None,
                                        "real_mean": sum(real) / len(real)}
    from edgeprune.fit import run  # the cached latency tables the run used: their held-out errors

    ctx = run.prepare(run.FitOptions(model="default", device="cpu", fmt="gguf", threads=res["threads"],
                                     out=ROOT / "out" / "bench-fit" / "replot", measure_tables=False))
    for dtype, e in res["latency_errors"].items():
        model = ctx["models"].get(dtype)
        if model is not None:
            h = model.errors["held_out"]["decode_tok_s"]
            e.update(table=Path(model.source).name, held_out_mean=h["mean_abs"], held_out_max=h["max_abs"],
                     **table_when(model.source))
    res["measured"] = [{"label": "dense q8_0", "ratio": 0.0, "dtype": "q8_0",
                        "measured": {"decode_tok_s": d["decode_tok_s"], "ppl": d["ppl"]}}]
    for r in rows:
        res["measured"].append({"label": r["target"], "ratio": r["ratio"], "dtype": r["dtype"],
                                "measured": {"decode_tok_s": r["decode"], "ppl": r["ppl"]}})
        n = r.get("naive")
        if n and not n.get("error"):
            res["measured"].append({"label": f"naive {n['ratio']:.2f}", "ratio": n["ratio"], "dtype": "q8_0",
                                    "measured": {"decode_tok_s": n["decode"], "ppl": n["ppl"]}})
    return res


def fmt_table(res: dict) -> str:
    d0, d1 = res["dense"], res.get("dense_end")
    drift = (f"{d1['decode_tok_s']} tok/s at the end ({100 * (d1['decode_tok_s'] / d0['decode_tok_s'] - 1):+.0f}% "
             "drift)" if d1 else "not measured again (the run was stopped after the rows below)")
    lines = [f"Default model (SmolLM2-135M), GGUF, device profile `cpu`, {res['threads']} runtime thread(s); recipe: "
             f"{res['recipe']}. PPL on {res['eval_text']} (first {res['max_tokens']} tokens, seq 128); dense PyTorch "
             f"PPL {res['dense_ppl']:.2f}.",
             f"Dense q8_0: {d0['decode_tok_s']} tok/s and {d0['peak_rss_mb']} MiB peak RSS at the start, "
             f"{drift}; load average {res['load_start']} at the start, {res.get('load_end', '–')} at the end on "
             f"{res['cores']} cores: the speed columns are noisy by about that much.", "",
             "| target | LSPS budget | chosen | decode tok/s predicted | measured (x dense) | peak RSS MiB predicted "
             "| measured | PPL (x dense) | met | naive: ratio, measured tok/s, PPL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['target']} | {r['budget']} | {r['error']} | | | | | | | |")
            continue
        n = r.get("naive")
        naive = "–" if not n else (f"{n['ratio']:.2f}: {n['error'][:80]}" if n.get("error") else
                                   f"{n['ratio']:.2f}, {n['decode']} ({n['speedup']:.2f}x), {n['ppl']:.2f}")
        lines.append(f"| {r['target']} | {r['budget']} | {r['ratio']:.2f} {r['dtype']}{' (stepped)' if r['stepped'] else ''} "
                     f"| {_f(r['pred_decode'])} | {r['decode']} ({r['speedup']:.2f}x) | {_f(r['pred_memory'])} | "
                     f"{r['memory']} | {r['ppl']:.2f} ({r['ppl_ratio']:.2f}x) | {'yes' if r['met'] else 'no: ' + ', '.join(r['missed'])} "
                     f"| {naive} |")
    mem = res["memory_errors"]
    lines += ["", "Memory prediction (from shapes and dtype, before export) vs measured peak RSS, every artifact of "
              "this run: " + ", ".join(f"{k} {v:+.1%}" for k, v in mem.items()) + "."]
    for dtype, e in res["latency_errors"].items():
        held = ("" if e["held_out_mean"] is None else f" (table {e['table']}{_when(e)}): decode tok/s "
                f"error on held-out shapes mean {e['held_out_mean']:.1%}, max {e['held_out_max']:.1%};")
        lines.append(f"Latency model {dtype}{held} on the real artifacts above, with the dense anchor "
                     f"(x{res['anchor'].get('decode:' + dtype, 1):.3f}), mean decode error {e['real_mean']:.1%}.")
    return "\n".join(lines) + "\n"


def table_when(source: str) -> dict:
    """When and at which load a latency table file was measured (read while the run uses it: a later measurement
    on the same machine replaces the cached file)."""
    import json

    try:
        t = json.loads(Path(source).read_text())
        return {"created": t["created"], "load": t["machine"]["load_avg"][0]}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def _when(e: dict) -> str:
    return f", measured {e['created']} at load {e['load']}" if e.get("created") else ""


def _f(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def plot(res: dict) -> Path:
    """bench/results/fit.png: measured PPL vs decode speed (fastest repeat) of every artifact of the run."""
    from edgeprune.report_fit import frontier_png

    points = []
    for m in res["measured"]:
        label, a = m["label"], m["measured"]
        role = "dense" if label.startswith("dense") else "naive" if label.startswith("naive") else "chosen"
        name = label if role == "dense" else f"{role if role == 'naive' else 'fit'} {m['ratio']:.2f} {m['dtype']}"
        points.append({"label": name, "role": role, "decode_tok_s": a["decode_tok_s"], "ppl": a["ppl"]})
    speeds = sorted({float(m.group(1)) for r in res["rows"] if (m := re.search(r"\(([\d.]+) tok/s\)", r["target"]))})
    png = frontier_png(points, targets={"min_decode_tok_s": speeds}, dense_ppl=res["dense_ppl"],
                       title=f"bench/fit.py: measured PPL vs decode speed, default model, GGUF, {res['threads']} "
                             f"thread(s)\nrecipe: {res['recipe']}")
    path = ROOT / "bench" / "results" / "fit.png"
    path.write_bytes(png)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speedups", default="1.3,1.6")
    ap.add_argument("--memory-cut", type=float, default=0.25)
    ap.add_argument("--budgets", default="params,latency", help="LSPS budgets to compare on the speed targets")
    ap.add_argument("--threads", default="1", help="runtime threads (1 on this shared 2-core machine)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--max-tokens", type=int, default=None, help="PPL tokens (default: the recipe's 8192)")
    ap.add_argument("--data", help="WikiText-2 under DATA/wikitext-2 (default: $EDGEPRUNE_DATA or ../shared/data): "
                    "valid calibrates, test is the PPL text")
    ap.add_argument("--work", default=str(ROOT / "out" / "bench-fit"))
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only rewrite the table and plot from fit.json")
    args = ap.parse_args()
    if args.replot:
        import json

        res = fill_partial(json.loads((ROOT / "bench" / "results" / "fit.json").read_text()))
        res["table"] = fmt_table(res)
        (ROOT / "bench" / "results" / "fit.md").write_text(res["table"])
        print(res["table"], f"plot: {plot(res)}", sep="\n")
        return

    # the recipe's texts are 'auto': WikiText-2 under $EDGEPRUNE_DATA (never the built-in text, whose PPL is not
    # comparable with the other tables)
    os.environ["EDGEPRUNE_DATA"] = str(data_dir(args.data))
    from edgeprune.fit import run, search
    from edgeprune.fit.cli import recipe_overrides

    work = Path(args.work)
    recipe = recipe_overrides(args.sets)
    common = dict(model="default", device="cpu", fmt="gguf", threads=args.threads, recipe=recipe, work=work,
                  max_tokens=args.max_tokens)
    res: dict = {"schema": "edgeprune.bench-fit/1", "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
                 "recipe": "full default (demo.toml [prune])" if not recipe else f"default with {recipe}",
                 "load_start": load_avg(), "cores": os.cpu_count(), "rows": []}
    # the dense q8_0 artifact: its measured speed and memory set the targets
    base_opts = run.FitOptions(**common, out=work / "dense", measure_tables=True)
    ctx = run.prepare(base_opts)
    run.evaluation(base_opts, ctx)
    dense_cand = search.predict(ctx["base"], 0.0, "gguf", "q8_0", ctx["models"], ctx["settings"], search.Targets(),
                                extra_bytes=ctx["extra_bytes"])
    dense = run.realise(base_opts, dense_cand, ctx)
    res["dense"] = {"decode_tok_s": dense["measured"]["decode_tok_s"], "peak_rss_mb": dense["measured"]["memory_mb"],
                    "ppl": dense["measured"]["ppl"], "predicted": dense["predicted_from_shapes"]}
    res["dense_ppl"], res["eval_text"] = ctx["ref_ppl"], ctx["eval_text"].name
    res["max_tokens"] = ctx["max_tokens"]
    print(f"dense q8_0: {res['dense']}", flush=True)
    measured = [("dense q8_0", dense)]
    s0, m0 = res["dense"]["decode_tok_s"], res["dense"]["peak_rss_mb"]
    # the anchor: speed predictions x measured / predicted dense speed of this run, per dtype (what `fit` does)
    res["anchor"] = {"decode:q8_0": s0 / dense["predicted_from_shapes"]["decode_tok_s"]}
    q4 = run.export_to(ctx["ckpt"], "gguf", "q4_k_m", work / "r00-gguf-q4_k_m")
    res["anchor"].update(run.anchor_factors(ctx["runner"](q4), ctx, "q4_k_m", search.Targets()))
    print(f"anchor: {res['anchor']}", flush=True)
    common["scale"] = ctx["scale"] = res["anchor"]
    jobs = [(f"decode >= {k}x ({k * s0:.1f} tok/s)", b, search.Targets(min_decode_tok_s=round(k * s0, 2)), k)
            for k in (float(x) for x in args.speedups.split(",")) for b in args.budgets.split(",")]
    cap = round((1 - args.memory_cut) * m0, 1)
    jobs.append((f"peak RSS <= {cap} MiB ({100 * args.memory_cut:.0f}% under dense)", "params",
                 search.Targets(max_memory_mb=cap), None))
    naive_done: dict = {}
    for name, budget, targets, speedup in jobs:
        print(f"== {name}, {budget} budget", flush=True)
        opts = run.FitOptions(**common, targets=targets, budget=budget,
                              out=work / f"fit-{len(res['rows'])}-{budget}")
        try:
            result = run.fit(opts)
            row = row_of(name, budget, result, None, res["dense"])
            measured += [(f"{name} {budget} {a['ratio']:.2f} {a['dtype']}", a) for a in result["attempts"]]
        except EdgePruneError as e:
            row = row_of(name, budget, None, str(e), res["dense"])
        res["rows"].append(row)
        save("fit", res)  # before the naive prune: a run stopped early keeps every finished target
        if speedup and not args.no_naive:
            if speedup not in naive_done:
                r = naive_ratio(ctx["base"], speedup, ctx["pcfg"].round_to)
                nopts = run.FitOptions(**common, targets=targets, out=work / f"naive-{speedup}")
                cand = search.predict(ctx["base"], r, "gguf", "q8_0", ctx["models"], ctx["settings"], targets,
                                      ctx["pcfg"].round_to, ctx["extra_bytes"])
                try:
                    a = run.realise(nopts, cand, ctx)
                    measured.append((f"naive {r:.2f}", a))
                    naive_done[speedup] = {"ratio": r, "decode": a["measured"]["decode_tok_s"],
                                           "speedup": round(a["measured"]["decode_tok_s"] / s0, 3),
                                           "ppl": a["measured"]["ppl"], "memory": a["measured"]["memory_mb"]}
                except EdgePruneError as e:  # e.g. an export whose parity check fails
                    naive_done[speedup] = {"ratio": r, "error": str(e)}
            row["naive"] = naive_done[speedup]
            save("fit", res)
    end = run.realise(base_opts, dense_cand, ctx)
    res["dense_end"] = {"decode_tok_s": end["measured"]["decode_tok_s"], "peak_rss_mb": end["measured"]["memory_mb"]}
    res["load_end"] = load_avg()
    res["memory_errors"] = {label: round(a["predicted_from_shapes"]["memory_mb"] / a["measured"]["memory_mb"] - 1, 4)
                            for label, a in measured}
    res["latency_errors"] = {}
    for dtype, model in ctx["models"].items():
        if model is None:
            continue
        real = [abs(a["predicted_from_shapes"]["decode_tok_s"] / a["measured"]["decode_tok_s"] - 1)
                for _, a in measured if a["dtype"] == dtype and a["predicted_from_shapes"].get("decode_tok_s")]
        e = model.errors["held_out"]["decode_tok_s"]
        res["latency_errors"][dtype] = {"table": Path(model.source).name, "held_out_mean": e["mean_abs"],
                                        "held_out_max": e["max_abs"],
                                        "real_mean": sum(real) / len(real) if real else float("nan"),
                                        **table_when(model.source)}
    res["measured"] = [{"label": label, **{k: a[k] for k in ("ratio", "dtype", "predicted_from_shapes", "measured")}}
                       for label, a in measured]
    res["table"] = fmt_table(res)
    save("fit", res)
    (ROOT / "bench" / "results" / "fit.md").write_text(res["table"])
    print(res["table"], f"plot: {plot(res)}", sep="\n")


if __name__ == "__main__":
    sys.exit(main())
