"""Dense baseline of the default model: WikiText-2 raw test PPL at seq 128 over the whole test set, and
zero-shot accuracy on PIQA, ARC-e, ARC-c, BoolQ, OpenBookQA. Writes bench/results/baseline.json;
`python bench/report.py` renders BENCHMARKS.md.

    python bench/baseline.py [--data ../shared/data] [--limit N] [--skip-zeroshot]
"""

from __future__ import annotations

import argparse
import time

from common import data_dir, load_result, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data")
    ap.add_argument("--limit", type=int, default=500, help="first N examples per zero-shot task (0: all)")
    ap.add_argument("--skip-zeroshot", action="store_true")
    ap.add_argument("--model", default="default")
    ap.add_argument("--only", choices=("wikitext2", "ptb", "zeroshot"), help="run one phase, keep the others' "
                    "results from bench/results/baseline.json")
    args = ap.parse_args()
    d = data_dir(args.data)

    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.evaluate.zeroshot import TASKS, evaluate_tasks
    from edgeprune.io import package_versions
    from edgeprune.models import load
    from edgeprune.models.info import model_info

    lm = load(args.model)
    info = model_info(lm)
    result = (load_result("baseline") or {}) if args.only else {}
    result.update({"model": args.model, "params": info["params"], "versions": package_versions(),
                   "date": time.strftime("%Y-%m-%d")})
    if args.only in (None, "wikitext2"):
        text = load_text(str(d / "wikitext-2" / "wiki.test.raw"))
        result["wikitext2_ppl128"] = perplexity(lm.model, lm.tokenizer, text, 128)
        print(f"WikiText-2 PPL@128: {result['wikitext2_ppl128']['ppl']:.3f}", flush=True)
        save("baseline", result)  # each phase is saved as it finishes
    if args.only in (None, "ptb"):
        ptb = load_text(str(d / "ptb" / "ptb.valid.txt"))
        result["ptb_ppl128"] = perplexity(lm.model, lm.tokenizer, ptb, 128)
        print(f"PTB valid PPL@128: {result['ptb_ppl128']['ppl']:.3f}", flush=True)
        save("baseline", result)
    if args.only in (None, "zeroshot") and not args.skip_zeroshot:
        result["zeroshot"] = evaluate_tasks(lm.model, lm.tokenizer, TASKS, d, limit=args.limit or None)
        print("zero-shot average acc:", round(result["zeroshot"]["average"]["acc"], 4))
    save("baseline", result)


if __name__ == "__main__":
    main()
