"""Every scorer at 10/20/30% uniform pruning of the default model: WikiText-2 raw test PPL (seq 128, the
first GRID_TOKENS tokens), scoring time and peak memory. Each scorer runs in its own process so that its peak
RSS is its own. Writes bench/results/scorers.json; `python bench/report.py` renders BENCHMARKS.md.

    python bench/scorers.py [--data ../shared/data] [--scorers piem,magnitude] [--ratios 0.1,0.2,0.3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import GRID_TOKENS, data_dir, load_result, save


def run_one(scorer: str, ratios: list[float], data: str, tokens: int, piem: str | None, attn_unit: str) -> dict:
    import resource
    import time

    from edgeprune.allocation import allocate
    from edgeprune.data import calibration_batches, load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load
    from edgeprune.scoring import make_scorer, score_model
    from edgeprune.selection import build_plan
    from edgeprune.surgery import apply_plan

    opts = {}
    if piem:
        a, b, g = (float(x) for x in piem.split(","))
        opts = {"alpha": a, "beta": b, "gamma": g}
    calib = load_text(f"{data}/wikitext-2/tokens/valid.txt", "calib")
    test = load_text(f"{data}/wikitext-2/wiki.test.raw", "eval")
    lm = load("default")
    batches = calibration_batches(lm.tokenizer, calib, 64, 128, 0)
    t0 = time.perf_counter()
    scorer_obj = make_scorer(scorer, **opts)
    scores = score_model(lm.adapter, scorer_obj, batches, progress=False)
    score_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = []
    for ratio in ratios:
        lm = load("default")
        alloc = allocate("uniform", lm.adapter, ratio, attn_unit=attn_unit)
        apply_plan(lm.adapter, build_plan(lm.adapter, scores, alloc))
        ppl = perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=tokens, progress=False)
        rows.append({"ratio": ratio, "ppl": ppl["ppl"], "tokens": ppl["tokens_scored"],
                     "params": sum(p.numel() for p in lm.model.parameters())})
    return {"scorer": scorer, "described": scorer_obj.describe(), "piem_weights": piem, "attn_unit": attn_unit, "scoring_seconds": score_s,
            "peak_rss_mib": peak, "rows": rows}


def dense_ppl(data: str, tokens: int) -> float:
    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load

    lm = load("default")
    test = load_text(f"{data}/wikitext-2/wiki.test.raw", "eval")
    return perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=tokens, progress=False)["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data")
    ap.add_argument("--scorers", default="magnitude,taylor,wanda-sp,fluctuation,random,piem")
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--tokens", type=int, default=GRID_TOKENS)
    ap.add_argument("--attn-unit", default="group")
    ap.add_argument("--piem-weights", default=None, help="alpha,beta,gamma for the piem row")
    ap.add_argument("--name", default="scorers", help="result file name under bench/results/")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = str(data_dir(args.data))
    ratios = [float(r) for r in args.ratios.split(",")]
    if args.one:
        print(json.dumps(run_one(args.one, ratios, data, args.tokens, args.piem_weights, args.attn_unit)))
        return
    result = load_result(args.name) or {"tokens": args.tokens, "runs": {}}
    if result.get("tokens") != args.tokens:
        result = {"tokens": args.tokens, "runs": {}}
    if "dense" not in result:
        result["dense"] = {"grid_ppl": dense_ppl(data, args.tokens)}
        save(args.name, result)
    for scorer in args.scorers.split(","):
        cmd = [sys.executable, __file__, "--one", scorer, "--data", data, "--ratios", args.ratios,
               "--tokens", str(args.tokens), "--attn-unit", args.attn_unit]
        if args.piem_weights and scorer == "piem":
            cmd += ["--piem-weights", args.piem_weights]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        run = json.loads(out.strip().splitlines()[-1])
        key = scorer if not (args.piem_weights and scorer == "piem") else f"piem[{args.piem_weights}]"
        result["runs"][key] = run
        print(key, " ".join(f"{r['ratio']:.0%}:{r['ppl']:.2f}" for r in run["rows"]),
              f"score {run['scoring_seconds']:.0f}s peak {run['peak_rss_mib']:.0f}MiB", flush=True)
        save(args.name, result)


if __name__ == "__main__":
    main()
