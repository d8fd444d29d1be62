"""Does distillation help a pruned checkpoint? A short check with one setting changed at a time: the teacher's
top-k, the cross-entropy share, the steps. Loads the pruned checkpoint and its dense model, computes the teacher
targets, distils (edgeprune.recover.distill, float32) and prints one JSON line: PPL on the first 4,096 WikiText-2
test tokens before and after, and the loss curve.

    python bench/distill_check.py PRUNED DENSE K CE STEPS [--lr R] [--lr-rule rms|absolute] [--data ../shared/data]
    python bench/distill_check.py out/pipeline/gemma3-270m-uniform/stages/prune/model gemma3-270m 64 0 40

Used for the Gemma-3-270M finding in the README (Results): with one absolute learning rate (4e-4, the rule before
the RMS-relative one: ``--lr 4e-4 --lr-rule absolute``) distillation made that model worse with either k; with
the RMS-relative default it helps.
Not here: the ablation's recovered rows (ablate.py), the demo's budget (recover_budget.py).
"""

from __future__ import annotations

import argparse
import json
import time

from common import data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pruned")
    ap.add_argument("dense")
    ap.add_argument("top_k", type=int)
    ap.add_argument("ce", type=float)
    ap.add_argument("steps", type=int)
    ap.add_argument("--lr", type=float, default=None, help="relative learning rate (default: RecoveryConfig's)")
    ap.add_argument("--lr-rule", default="rms", help="rms (the default) or absolute (the rule before it)")
    ap.add_argument("--data")
    args = ap.parse_args()
    data = data_dir(args.data)

    from edgeprune.data import calibration_batches, load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load
    from edgeprune.recover import RecoveryConfig, distill
    from edgeprune.teacher import teacher_targets

    calib = load_text(f"{data}/wikitext-2/tokens/valid.txt", "calib")
    test = load_text(f"{data}/wikitext-2/wiki.test.raw", "eval")
    student, dense = load(args.pruned), load(args.dense)
    lr = {"lr": args.lr} if args.lr else {}
    rc = RecoveryConfig(steps=args.steps, **lr, lr_rule=args.lr_rule, batch_size=4, top_k=args.top_k, ce_weight=args.ce,
                        autocast="off")
    windows = calibration_batches(student.tokenizer, calib, rc.steps * rc.batch_size, 128, rc.seed)
    start = time.time()
    targets = teacher_targets(dense.model, windows, rc.top_k, rc.temperature, progress=False)
    del dense

    def ppl() -> float:
        return perplexity(student.model, student.tokenizer, test, 128, max_tokens=4096, progress=False)["ppl"]

    before = ppl()
    rec = distill(student.model, targets, windows, rc, progress=False)
    print(json.dumps({"lr": rc.lr, "lr_rule": rc.lr_rule, "top_k": rc.top_k, "ce": rc.ce_weight, "steps": rc.steps,
                      "ppl_before": before, "ppl_after": ppl(), "loss_curve": rec["kl_curve"], "seconds": time.time() - start}))


if __name__ == "__main__":
    main()
