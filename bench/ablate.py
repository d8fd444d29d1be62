"""The paper-style ablation on the default model: methods x ratios, each pruned from the dense model, then
WikiText-2 raw test PPL (seq 128, the same first --tokens tokens for every row), zero-shot average over PIQA,
ARC-e, ARC-c, BoolQ, OpenBookQA (first --limit examples per task), parameter count and decode speed on this
CPU. Each row runs in its own process. Writes bench/results/ablation.json; `python bench/report.py` renders it.

    python bench/ablate.py [--data ../shared/data] [--ratios 0.2,0.3,0.5] [--methods a,b] [--limit 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import GRID_TOKENS, data_dir, load_result, save

# name -> prune options (PruneConfig fields)
METHODS = {
    "magnitude+uniform": dict(scorer="magnitude", allocator="uniform"),
    "taylor+uniform (LLM-Pruner)": dict(scorer="taylor", allocator="uniform"),
    "wanda-sp+uniform": dict(scorer="wanda-sp", allocator="uniform"),
    "FLAP (fluctuation+global+bias)": dict(scorer="fluctuation", allocator="global", bias_compensation=True),
    "PIEM+uniform (PIEM alone)": dict(scorer="piem", allocator="uniform"),
    "magnitude+LSPS (LSPS alone)": dict(scorer="magnitude", allocator="lsps"),
    "PIEM+LSPS one-shot": dict(scorer="piem", allocator="lsps"),
    "PIEM+LSPS multi-round (K=3)": dict(scorer="piem", allocator="lsps", rounds=3),
    "depth (ShortGPT, Block Influence)": dict(scorer="fluctuation", allocator="depth"),
}


def decode_speed(model, tokenizer, n_new: int = 32) -> float:
    import torch

    ids = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n_new, do_sample=False, min_new_tokens=n_new)
    return n_new / (time.perf_counter() - t)


def run_one(method: str, ratio: float, data: str, tokens: int, limit: int | None) -> dict:
    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.evaluate.zeroshot import TASKS, evaluate_tasks
    from edgeprune.models import load
    from edgeprune.prune import PruneConfig, prune_model

    lm = load("default")
    record = {}
    if ratio > 0:
        calib = load_text(f"{data}/wikitext-2/tokens/valid.txt", "calib")
        record = prune_model(lm, PruneConfig(ratio=ratio, **METHODS[method]), calib, progress=False)
    test = load_text(f"{data}/wikitext-2/wiki.test.raw", "eval")
    ppl = perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=tokens, progress=False)
    row = {"method": method, "ratio": ratio, "ppl": ppl["ppl"], "tokens": ppl["tokens_scored"],
           "params": sum(p.numel() for p in lm.model.parameters()),
           "decode_tok_s": decode_speed(lm.model, lm.tokenizer), "prune_seconds": record.get("seconds")}
    if limit != 0:
        z = evaluate_tasks(lm.model, lm.tokenizer, TASKS, data, limit=limit, progress=False)
        row["zeroshot_avg_acc"] = z["average"]["acc"]
        row["zeroshot"] = {k: v["acc"] for k, v in z["tasks"].items()}
    if record:
        row["layer_shapes"] = record["layer_shapes"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data")
    ap.add_argument("--ratios", default="0.2,0.3,0.5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tokens", type=int, default=GRID_TOKENS)
    ap.add_argument("--limit", type=int, default=100, help="zero-shot examples per task (0: skip zero-shot)")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = str(data_dir(args.data))
    if args.one:
        print(json.dumps(run_one(args.one[0], float(args.one[1]), data, args.tokens, args.limit)))
        return
    result = load_result("ablation") or {}
    if result.get("tokens") != args.tokens or result.get("limit") != args.limit:
        result = {"tokens": args.tokens, "limit": args.limit, "rows": {}}
    jobs = [("dense", 0.0)] + [(m, float(r)) for r in args.ratios.split(",") for m in args.methods.split(",")]
    for method, ratio in jobs:
        if method != "dense" and method not in METHODS:
            sys.exit(f"error: unknown method {method!r}; known: {', '.join(METHODS)}")
        key = f"{method}@{ratio:g}"
        if key in result["rows"]:
            continue
        cmd = [sys.executable, __file__, "--one", method, str(ratio), "--data", data, "--tokens", str(args.tokens),
               "--limit", str(args.limit)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{key}: failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
            continue
        row = json.loads(p.stdout.strip().splitlines()[-1])
        result["rows"][key] = row
        save("ablation", result)
        print(f"{key}: PPL {row['ppl']:.2f}  zero-shot {row.get('zeroshot_avg_acc', float('nan')):.4f}  "
              f"{row['params'] / 1e6:.1f}M  {row['decode_tok_s']:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
