"""The paper-style ablation on the default model (or --model): methods x ratios, each pruned from the dense model, then
WikiText-2 raw test PPL (seq 128, the same first --tokens tokens for every row), zero-shot average over PIQA,
ARC-e, ARC-c, BoolQ, OpenBookQA (first --limit examples per task), parameter count and decode speed on this
CPU. Each method runs in its own process, which prunes every ratio from a fresh dense model. Writes
bench/results/ablation.json; `python bench/report.py` renders it.

    python bench/ablate.py [--data ../shared/data] [--ratios 0.2,0.3,0.5] [--recovery-ratios 0.2,0.3]
                           [--methods a,b] [--limit 50]
    python bench/ablate.py --speed     # then, on a quiet machine: every row's decode speed from its shapes
    python bench/ablate.py --model gemma3-270m --methods ...   # another model: bench/results/ablation-MODEL.json

Every method also has a "... + distillation" variant (recovery, RECOVERY below, 10-20 min per row on 2 cores),
run at --recovery-ratios; its process measures the same pruned model before recovery too, which gives the base
method's row (with --methods naming only distillation variants, both tables fill from one pruning). Several processes
with disjoint --methods may run at once (rows are merged on save); with more processes than cores, give each one
thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import SMALL_GRID_TOKENS, data_dir, load_result, save

# name -> prune options (PruneConfig fields). Every row names all the options it depends on, so a change of
# PruneConfig's defaults does not silently change a row. Published baselines run as published (one shot, no
# refit; FLAP with its bias compensation); PIEM alone / LSPS alone / both share the least-squares refit so the rows
# isolate the scorer and the allocator, and one row removes the refit from the full method. PIEM rows use the
# weights PIEM ships with (PIEMScorer's defaults), recorded per row as `piem_weights`.
PUBLISHED = dict(allocator="uniform", sensitivity="bi", rounds=1, reconstruct=False, bias_compensation=False)
PIEM = dict(scorer="piem")
OURS = dict(PIEM, allocator="lsps", sensitivity="bi", rounds=1, reconstruct=True, bias_compensation=False)
METHODS = {
    "magnitude+uniform": dict(PUBLISHED, scorer="magnitude"),
    "taylor+uniform (LLM-Pruner)": dict(PUBLISHED, scorer="taylor"),
    "wanda-sp+uniform": dict(PUBLISHED, scorer="wanda-sp"),
    "FLAP (fluctuation+global+bias)": dict(PUBLISHED, scorer="fluctuation", allocator="global", bias_compensation=True),
    "depth (ShortGPT: Block Influence)": dict(PUBLISHED, scorer="fluctuation", allocator="depth"),
    "PIEM+uniform (PIEM alone)": dict(OURS, allocator="uniform"),
    "PIEM+uniform without refit": dict(OURS, allocator="uniform", reconstruct=False),
    "magnitude+LSPS (LSPS alone)": dict(OURS, scorer="magnitude"),
    "PIEM+LSPS one-shot": OURS,
    "PIEM+LSPS multi-round (K=2)": dict(OURS, rounds=2),
    "PIEM+LSPS multi-round (K=2) without refit": dict(OURS, rounds=2, reconstruct=False),
    "PIEM+LSPS multi-round (K=3)": dict(OURS, rounds=3),
}
# Recovery by distillation from the dense model (edgeprune/recover.py), the same budget for every row that has
# it: 200 steps x 4 windows x 128 tokens of WikiText-2 valid. Every method can have it, so the "with recovery"
# rows compare like with like. The learning rate is PruneConfig's (RMS-relative); rows recovered before it record
# no lr_rule and used 4e-4 absolute (bench/report.py marks them).
RECOVERY = dict(recover_steps=200, recover_batch=4, recover_freeze=0, recover_autocast="off")
DISTILL = " + distillation"
for _name in list(METHODS):
    METHODS[_name + DISTILL] = dict(METHODS[_name], **RECOVERY)


def decode_speed(model, tokenizer, n_new: int = 32, repeats: int = 1) -> float:
    """Greedy decode tokens/s at batch 1 (median of ``repeats`` runs after a warm-up)."""
    import statistics

    import torch

    ids = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    speeds = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
            speeds.append(n_new / (time.perf_counter() - t))
    return statistics.median(speeds)


def shaped_model(base_config, shapes: list[dict]):
    """``base_config``'s architecture with the given per-layer widths and random weights: decode speed depends on
    the shapes only, so every row's speed can be measured again in one quiet pass without re-pruning."""
    from edgeprune.models.remote_code import EdgePruneConfig, EdgePruneForCausalLM

    base = base_config.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version"):
        base.pop(k, None)
    cfg = EdgePruneConfig(**{**base, "num_hidden_layers": len(shapes),
                             "layer_num_heads": [s["num_heads"] for s in shapes],
                             "layer_num_kv_heads": [s["num_kv_heads"] for s in shapes],
                             "layer_intermediate_size": [s["intermediate_size"] for s in shapes]})
    return EdgePruneForCausalLM(cfg).eval()


def result_name(model: str) -> str:
    """The results file of ``model``'s grid: the default model's is plain ``ablation`` (the README's table)."""
    return "ablation" if model == "default" else f"ablation-{model}"


def measure_speeds(result: dict, model: str, repeats: int) -> None:
    """Decode speed of every row from its layer shapes, one row after another in this process."""
    import os

    from edgeprune.models import load

    if os.getloadavg()[0] > 1.0:
        print(f"warning: load average {os.getloadavg()[0]:.1f}: speeds will be low and noisy", flush=True)
    lm = load(model)
    tokenizer, dense_shapes = lm.tokenizer, [s.to_dict() for s in lm.adapter.shapes()]
    for key, row in result["rows"].items():
        model = shaped_model(lm.model.config, row.get("layer_shapes") or dense_shapes)
        row["decode_tok_s"] = decode_speed(model, tokenizer, repeats=repeats)
        row["decode_measured"] = f"speed pass, {repeats} repeats, {os.getloadavg()[0]:.1f} load"
        print(f"{key}: {row['decode_tok_s']:.1f} tok/s", flush=True)
        save(result_name(model), result)


def reuse_speed(rows: dict, row: dict) -> None:
    """Give ``row`` the speed-pass decode speed of a row with the same layer shapes, when there is one: decode
    speed depends on the shapes only, and one quiet pass is comparable across rows where times taken during a
    pruning run (under whatever else the machine ran) are not."""
    same = rows.get(f"{row['method']}@{row['ratio']:g}")  # the row this one replaces comes first
    for other in ([same] if same else []) + list(rows.values()):
        if other.get("decode_measured") and other.get("layer_shapes") == row.get("layer_shapes"):
            row["decode_tok_s"], row["decode_measured"] = other["decode_tok_s"], other["decode_measured"]
            return


def evaluate(lm, data: str, tokens: int, limit: int) -> dict:
    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.evaluate.zeroshot import TASKS, evaluate_tasks

    test = load_text(f"{data}/wikitext-2/wiki.test.raw", "eval")
    ppl = perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=tokens, progress=False)
    row = {"ppl": ppl["ppl"], "tokens": ppl["tokens_scored"],
           "params": sum(p.numel() for p in lm.model.parameters()),
           "decode_tok_s": decode_speed(lm.model, lm.tokenizer)}
    row["zeroshot_limit"] = limit
    if limit != 0:
        z = evaluate_tasks(lm.model, lm.tokenizer, TASKS, data, limit=limit, progress=False)
        row["zeroshot_avg_acc"] = z["average"]["acc"]
        row["zeroshot"] = {k: v["acc"] for k, v in z["tasks"].items()}
    return row


def shipped_piem_weights() -> list[float]:
    from edgeprune.scoring.scorers import PIEMScorer

    d = PIEMScorer()
    return [d.alpha, d.beta, d.gamma]


def _row(method: str, ratio: float, evaluated: dict, record: dict) -> dict:
    row = {"method": method, "ratio": ratio, **evaluated, "prune_seconds": record.get("seconds"),
           "layer_shapes": record.get("layer_shapes")}
    if METHODS.get(method, {}).get("scorer") == "piem":
        row["piem_weights"] = shipped_piem_weights()
    if record:
        row["decoder_reduction"] = record["decoder_reduction"]
        row["allocation"] = [r["allocation"] for r in record["rounds"]]
        row["sensitivity"] = [r["sensitivity"] for r in record["rounds"]]
    return row


def run_method(method: str, ratios: list[float], data: str, tokens: int, limit: int, model: str = "default",
               recover_steps: int | None = None) -> None:
    """One method at every ratio, in this process: round 1's scores and sensitivities (which see the dense model
    whatever the ratio) are computed once and shared; every ratio is pruned from a fresh dense model.

    A "+ distillation" method also measures its pruned model before recovery and emits that as the base method's
    row: both rows then come from one and the same pruning."""
    from edgeprune.data import load_text
    from edgeprune.models import load
    from edgeprune.prune import PruneConfig, prune_model

    cache: dict = {}
    options = dict(METHODS.get(method, {}))
    if recover_steps is not None and options.get("recover_steps"):
        options["recover_steps"] = recover_steps
    calib = load_text(f"{data}/wikitext-2/tokens/valid.txt", "calib")
    base = method.removesuffix(DISTILL) if method.endswith(DISTILL) else None
    for ratio in ratios:
        lm = load(model)
        record, before = {}, {}
        if ratio > 0:
            def hook(m, before=before):
                before["evaluated"] = evaluate(m, data, tokens, limit)

            record = prune_model(lm, PruneConfig(ratio=ratio, **options), calib, progress=False,
                                 cache=cache, before_recovery=hook if base else None)
        if before:
            row = _row(base, ratio, before["evaluated"], record)
            row["prune_seconds"] = record["seconds"] - record["recovery"]["seconds"]
            row["same_pruning_as"] = method
            print("ROW " + json.dumps(row), flush=True)
        row = _row(method, ratio, evaluate(lm, data, tokens, limit), record)
        if record:
            row["recovery"] = record["recovery"]
        print("ROW " + json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data")
    ap.add_argument("--model", default="default",
                    help="model name or path (edgeprune.models.load); rows go to bench/results/ablation-MODEL.json "
                         "unless it is the default model")
    ap.add_argument("--recover-steps", type=int,
                    help=f"distillation steps of the '+ distillation' rows (default {RECOVERY['recover_steps']}); "
                         "one budget per results file keeps its rows comparable")
    ap.add_argument("--ratios", default="0.2,0.3,0.5")
    ap.add_argument("--recovery-ratios", default="0.2,0.3",
                    help="ratios of the '+ distillation' methods (10-20 min of distillation per row on 2 cores)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tokens", type=int, default=SMALL_GRID_TOKENS)
    ap.add_argument("--limit", type=int, default=50,
                    help="zero-shot examples per task (0: skip zero-shot; rows that have it keep it)")
    ap.add_argument("--speed", action="store_true",
                    help="only re-measure every saved row's decode speed from its shapes (run on a quiet machine)")
    ap.add_argument("--rerun", action="store_true",
                    help="re-measure the named methods' rows even when they are saved (after a default changed)")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "RATIOS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = str(data_dir(args.data))
    if args.one:
        run_method(args.one[0], [float(r) for r in args.one[1].split(",")], data, args.tokens, args.limit,
                   args.model, args.recover_steps)
        return
    name = result_name(args.model)
    result = load_result(name) or {}
    result["model"] = args.model
    if args.speed:
        if not result.get("rows"):
            sys.exit("error: no ablation rows to time yet")
        measure_speeds(result, args.model, repeats=3)
        return
    if result.get("rows") and result.get("tokens") != args.tokens:
        sys.exit(f"error: bench/results/{name}.json holds rows scored on {result['tokens']:,} tokens; rerun with "
                 f"--tokens {result['tokens']} or move the file away to start a grid on {args.tokens:,}")
    result.setdefault("rows", {})
    result["tokens"] = args.tokens
    if "piem_weights" in result:  # rows saved before rows recorded their own PIEM weights used these
        result["legacy_piem_weights"] = result.pop("piem_weights")

    for row in result["rows"].values():  # rows saved before a speed pass measured their shapes
        if not row.get("decode_measured"):
            reuse_speed(result["rows"], row)

    methods = args.methods.split(",")

    def done(key: str) -> bool:  # a row is reused unless this run asks for zero-shot it lacks, or --rerun
        row = result["rows"].get(key)
        if row is None or (args.rerun and row["method"] in methods):
            return False
        return args.limit == 0 or row.get("zeroshot_limit") == args.limit

    for m in methods:
        if m not in METHODS:
            sys.exit(f"error: unknown method {m!r}; known: {', '.join(METHODS)}")
    rec = [float(r) for r in args.recovery_ratios.split(",")]

    def ratios_of(m: str) -> list[float]:  # a base method's rows at the recovery ratios come from its variant
        if m.endswith(DISTILL):
            return rec
        return [float(r) for r in args.ratios.split(",") if m + DISTILL not in methods or float(r) not in rec]

    jobs = [("dense", [0.0])] + [(m, ratios_of(m)) for m in methods]
    for method, ratios in jobs:
        todo = [f"{r:g}" for r in ratios if not done(f"{method}@{r:g}")]
        if not todo:
            continue
        cmd = [sys.executable, __file__, "--one", method, ",".join(todo), "--data", data, "--tokens",
               str(args.tokens), "--limit", str(args.limit), "--model", args.model]
        if args.recover_steps is not None:
            cmd += ["--recover-steps", str(args.recover_steps)]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as p:
            for line in p.stdout:
                if not line.startswith("ROW "):
                    continue
                row = json.loads(line[4:])
                key = f"{row['method']}@{row['ratio']:g}"
                reuse_speed(result["rows"], row)
                result["rows"][key] = row
                # merge with rows other ablate processes (other --methods) saved meanwhile
                latest = load_result(name) or {}
                if latest.get("tokens") == args.tokens:
                    result["rows"] = {**latest["rows"], key: row}
                save(name, result)
                print(f"{key}: PPL {row['ppl']:.2f}  zero-shot {row.get('zeroshot_avg_acc', float('nan')):.4f}  "
                      f"{row['params'] / 1e6:.1f}M  {row['decode_tok_s']:.1f} tok/s", flush=True)
        if p.returncode != 0:
            print(f"{method}: failed (exit {p.returncode})", flush=True)


if __name__ == "__main__":
    main()
