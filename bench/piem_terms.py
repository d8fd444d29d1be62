"""PIEM's terms alone, in pairs and all three, at uniform 20% and 30% pruning of the default model: the
measurement behind PIEM's default weights. The three terms are computed once (one gradient pass, one
layer-by-layer pass) and recombined for every row. Writes bench/results/piem_terms.json.

    python bench/piem_terms.py [--data ../shared/data] [--ratios 0.2,0.3]
"""

from __future__ import annotations

import argparse
import time

from common import SMALL_GRID_TOKENS, data_dir, load_result, save

# (alpha, beta, gamma) = weights of the (weight, gradient, context) terms
GRID = {
    "W": (1, 0, 0), "G": (0, 1, 0), "C": (0, 0, 1),
    "W+G": (0.5, 0.5, 0), "W+C": (0.5, 0, 0.5), "G+C": (0, 0.5, 0.5),
    "W+G+C (1/3 each)": (1, 1, 1), "0.1W+0.3G+0.6C": (0.1, 0.3, 0.6), "0.2G+0.8C": (0, 0.2, 0.8),
    "0.1W+0.1G+0.8C": (0.1, 0.1, 0.8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data")
    ap.add_argument("--ratios", default="0.2,0.3")
    ap.add_argument("--tokens", type=int, default=SMALL_GRID_TOKENS)
    ap.add_argument("--rows", default=",".join(GRID), help="subset of rows")
    args = ap.parse_args()
    d = data_dir(args.data)

    from edgeprune.allocation import allocate
    from edgeprune.data import calibration_batches, load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load
    from edgeprune.scoring import score_model
    from edgeprune.scoring.base import UnitScores
    from edgeprune.scoring.scorers import PIEMScorer, combine_terms
    from edgeprune.selection import build_plan
    from edgeprune.surgery import apply_plan

    class Recorder(PIEMScorer):
        def __init__(self):
            super().__init__(1, 1, 1)
            self.layers = []

        def score_layer(self, layer, stats, grads):
            self.layers.append((self.terms(layer, stats, grads), stats))
            return super().score_layer(layer, stats, grads)

    calib = load_text(str(d / "wikitext-2" / "tokens" / "valid.txt"), "calib")
    test = load_text(str(d / "wikitext-2" / "wiki.test.raw"), "eval")
    lm = load("default")
    rec = Recorder()
    t0 = time.perf_counter()
    score_model(lm.adapter, rec, calibration_batches(lm.tokenizer, calib, 64, 128, 0), progress=False)
    seconds = time.perf_counter() - t0
    ratios = [float(r) for r in args.ratios.split(",")]
    previous = load_result("piem_terms") or {}
    rows = previous.get("rows", {}) if previous.get("tokens") == args.tokens else {}
    for name in args.rows.split(","):
        if name in rows:
            continue
        a, b, g = GRID[name]
        w = {"weight": a, "gradient": b, "context": g}
        scores = UnitScores("piem", [combine_terms(t, w) for t, _ in rec.layers])
        rows[name] = {"weights": [a, b, g], "ppl": {}}
        for ratio in ratios:
            lm = load("default")
            apply_plan(lm.adapter, build_plan(lm.adapter, scores, allocate("uniform", lm.adapter, ratio)))
            ppl = perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=args.tokens, progress=False)["ppl"]
            rows[name]["ppl"][f"{ratio:g}"] = ppl
        print(name, {k: round(v, 2) for k, v in rows[name]["ppl"].items()}, flush=True)
        save("piem_terms", {"tokens": args.tokens, "scoring_seconds": seconds, "rows": rows})


if __name__ == "__main__":
    main()
