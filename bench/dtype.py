"""bfloat16 vs float32 working dtype on the default model: the same 20% PIEM + LSPS pruning in each, compared by
plan (kept units per layer) and WikiText-2 PPL, with the wall time and peak RSS of each run.

    .venv/bin/python bench/dtype.py [--data DIR] [--n-samples 32] [--tokens 8192]

Each dtype runs in its own process (peak RSS is per process). Settings are the fast ones: one round, Block
Influence sensitivity, no refit or distillation. Prints a table and writes bench/results/dtype.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import DEFAULT_DATA, data_dir, save


def one(dtype: str, data: str, n_samples: int, tokens: int) -> dict:
    import resource

    import torch

    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load
    from edgeprune.prune import PruneConfig, prune_model

    torch.manual_seed(0)
    lm = load("default", dtype=dtype)
    calib = load_text(f"{data}/wikitext-2/tokens/valid.txt", "calib")
    test = load_text(f"{data}/wikitext-2/wiki.test.raw", "eval")
    dense = perplexity(lm.model, lm.tokenizer, test, seq_len=128, max_tokens=tokens, progress=False)["ppl"]
    cfg = PruneConfig(0.2, scorer="piem", allocator="lsps", sensitivity="bi", round_to=32, n_samples=n_samples,
                      seq_len=128)
    start = time.perf_counter()
    record = prune_model(lm, cfg, calib, progress=False)
    seconds = time.perf_counter() - start
    ppl = perplexity(lm.model, lm.tokenizer, test, seq_len=128, max_tokens=tokens, progress=False)["ppl"]
    upcast = None
    if dtype != "float32":  # the same pruned weights evaluated in float32: the plan's effect without bf16 math
        lm.model.float()
        upcast = perplexity(lm.model, lm.tokenizer, test, seq_len=128, max_tokens=tokens, progress=False)["ppl"]
    return {"dtype": dtype, "dense_ppl": dense, "ppl": ppl, "ppl_in_float32": upcast, "prune_seconds": seconds,
            "plan": record["plan"]["layers"], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def same_units(a: list, b: list) -> tuple[int, int]:
    """(units kept by both plans, units kept by either), over heads and channels of every layer."""
    both = either = 0
    for x, y in zip(a, b, strict=True):
        for key in ("heads", "channels"):
            sx, sy = set(x[key]), set(y[key])
            both += len(sx & sy)
            either += len(sx | sy)
    return both, either


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = str(data_dir(args.data))
    if args.one:
        print(json.dumps(one(args.one, data, args.n_samples, args.tokens)))
        return
    rows = {}
    for dtype in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, __file__, "--one", dtype, "--data", data, "--n-samples",
                              str(args.n_samples), "--tokens", str(args.tokens)], check=True, capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        rows[dtype] = json.loads(out.stdout.strip().splitlines()[-1])
    f32, bf16 = rows["float32"], rows["bfloat16"]
    shapes_equal = [(len(x["heads"]), len(x["channels"])) for x in f32["plan"]] == \
                   [(len(x["heads"]), len(x["channels"])) for x in bf16["plan"]]
    both, either = same_units(f32["plan"], bf16["plan"])
    print(f"default model, 20% piem + lsps (bi), 1 round, {args.n_samples} calibration windows; "
          f"WikiText-2 test PPL on the first {args.tokens} tokens (seq 128); load average {os.getloadavg()[0]:.2f}")
    print("| dtype | dense PPL | pruned PPL | pruned PPL evaluated in fp32 | prune s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for r in (f32, bf16):
        up = f"{r['ppl_in_float32']:.2f}" if r["ppl_in_float32"] else "–"
        print(f"| {r['dtype']} | {r['dense_ppl']:.2f} | {r['ppl']:.2f} | {up} | {r['prune_seconds']:.0f} | "
              f"{r['peak_rss_mib']:.0f} |")
    rel = bf16["ppl"] / f32["ppl"] - 1
    print(f"same layer shapes: {shapes_equal}; kept units in common: {both}/{either} ({both / either:.2%}); "
          f"pruned PPL bf16 vs fp32: {rel:+.2%}")
    for r in rows.values():  # the result file keeps the kept widths, not every kept index
        r["kept_per_layer"] = [[len(x["heads"]), len(x["channels"])] for x in r.pop("plan")]
    save("dtype", {"rows": rows, "same_shapes": shapes_equal, "units_in_common": [both, either],
                   "ppl_rel_diff": rel, "loadavg": os.getloadavg()})


if __name__ == "__main__":
    main()
