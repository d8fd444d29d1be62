"""How much distillation the demo needs: the demo's prune stage (edgeprune/configs/demo.toml's [prune]) pruned once,
then distilled from the same pruned model with several recovery budgets (steps x lr), each measured by PPL on the
demo's evaluation tokens (WikiText-2 test, seq 128, first 8,192) and by its wall time. A budget is
STEPS:LR[:FREEZE[:AMP]], FREEZE the number of bottom decoder layers kept frozen (RecoveryConfig.freeze_layers: the
backward pass stops above them), AMP ``fp32`` (default), ``bf16`` (the student's steps under bfloat16 autocast) or
``bf16all`` (the teacher pass too; its targets are computed once more, under autocast, and timed).

    python bench/recover_budget.py [--data ../shared/data] [--budgets 100:2e-3,60:3e-3,100:2e-3:10]
    python bench/recover_budget.py --lr-rule absolute --budgets 100:4e-4,60:6e-4   # the README's table (before the
                                                                                   # RMS-relative learning rates)

The teacher targets are computed once for the largest budget; a budget of N steps uses the first N x batch windows
of them, which are the windows the product draws for N steps (calibration_batches takes its offsets one by one from
one seeded stream). The pruned model is kept under --cache (out/recover_budget/KEY), so a rerun with other
budgets only distills. Prints a table and writes bench/results/recover_budget.json. Timings compare rows of one run
only (this machine is shared; the load average is recorded).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from common import data_dir, save


def _budgets(text: str) -> list[tuple[int, float, int, str]]:
    out = []
    for item in text.split(","):
        steps, lr, *rest = item.split(":")
        freeze, amp = (rest + ["0", "fp32"][len(rest):])[:2]
        if amp not in ("fp32", "bf16", "bf16all"):
            raise SystemExit(f"error: AMP must be fp32, bf16 or bf16all, not {amp!r}")
        out.append((int(steps), float(lr), int(freeze), amp))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--budgets", default="100:2e-3,60:3e-3,100:2e-3:10")
    ap.add_argument("--lr-rule", default="rms", help="what LR means (RecoveryConfig.lr_rule): rms (the product's) "
                    "or absolute (the rule the README's table was measured with)")
    ap.add_argument("--cache", default="out/recover_budget", help="where the pruned checkpoint is kept between runs")
    ap.add_argument("--name", default="recover_budget", help="results file: bench/results/NAME.json")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override the demo config, as `edgeprune run --set` does (e.g. prune.n_samples=32)")
    args = ap.parse_args()
    os.environ["EDGEPRUNE_DATA"] = str(data_dir(args.data))

    import torch

    from edgeprune.data import calibration_batches, resolve_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load
    from edgeprune.pipeline.config import load_config
    from edgeprune.recover import distill
    from edgeprune.teacher import teacher_targets

    run = load_config("demo", args.set)
    cfg = replace(run.prune, recover_steps=0)
    calib, evtext = resolve_text(run.data.calib, "calib"), resolve_text(run.data.eval, "eval")
    budgets = _budgets(args.budgets)
    lm = load(run.run.model)

    def ppl(model) -> float:
        return perplexity(model, lm.tokenizer, evtext, run.evaluate.seq_len, run.evaluate.max_tokens,
                          run.evaluate.batch_size, progress=False)["ppl"]

    rc = replace_steps(run.prune, max(b[0] for b in budgets))
    t0 = time.perf_counter()
    windows = calibration_batches(lm.tokenizer, calib, rc.steps * rc.batch_size, cfg.seq_len, rc.seed)
    teacher, teacher_s = None, None
    if any(b[3] != "bf16all" for b in budgets):  # the float32 teacher pass
        teacher = teacher_targets(lm.model, windows, rc.top_k, rc.temperature)
        teacher_s = time.perf_counter() - t0
    teacher_bf16, teacher_bf16_s = None, None
    if any(b[3] == "bf16all" for b in budgets):
        t0 = time.perf_counter()
        teacher_bf16 = teacher_targets(lm.model, windows, rc.top_k, rc.temperature, autocast=True)
        teacher_bf16_s = time.perf_counter() - t0
        print(f"teacher targets under bf16 autocast {teacher_bf16_s:.0f} s (float32: {teacher_s or 0:.0f} s)",
              flush=True)
    lm, record, prune_s = pruned(lm, run.run.model, cfg, calib, Path(args.cache))
    rows = [{"steps": 0, "lr": None, "ppl": ppl(lm.model), "seconds": 0.0}]
    print(f"teacher targets {rc.steps * rc.batch_size} windows {teacher_s or teacher_bf16_s:.0f} s; prune (no recovery) "
          f"{prune_s:.0f} s (scoring {[round(r['scoring_seconds']) for r in record['rounds']]}); "
          f"PPL before recovery {rows[0]['ppl']:.2f}", flush=True)
    for steps, lr, freeze, amp in budgets:
        student = copy.deepcopy(lm.model)
        load_before = os.getloadavg()[0]
        rc_b = replace(replace_steps(run.prune, steps, lr), freeze_layers=freeze, lr_rule=args.lr_rule,
                       autocast="off" if amp == "fp32" else "on")
        rec = distill(student, teacher_bf16 if amp == "bf16all" else teacher, windows, rc_b)
        rows.append({"steps": steps, "lr": lr, "lr_rule": args.lr_rule, "freeze_layers": freeze, "amp": amp, "ppl": ppl(student), "seconds": rec["seconds"],
                     "s_per_step": rec["seconds"] / steps, "curve": rec["kl_curve"],
                     "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
        r = rows[-1]
        print(f"{steps} steps lr {lr:g} freeze {freeze} {amp}: PPL {r['ppl']:.2f}, {r['seconds']:.0f} s ({r['s_per_step']:.2f} s/step), "
              f"load {r['load']}", flush=True)
        del student
        torch.manual_seed(0)
    print("\n| steps | peak lr | frozen layers | autocast | PPL | distillation s | s/step | load |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['lr'] or '–'} | {r.get('freeze_layers', 0)} | {r.get('amp', 'fp32')} | {r['ppl']:.2f} | {r['seconds']:.0f} | "
              f"{r.get('s_per_step', 0):.2f} | {r.get('load', '–')} |")
    save(args.name, {"overrides": args.set, "prune_config": record["config"], "teacher_seconds": teacher_s,
                            "teacher_bf16_seconds": teacher_bf16_s,
                            "prune_seconds": prune_s, "rows": rows, "threads": torch.get_num_threads()})


def pruned(lm, model: str, cfg, calib, cache: Path):
    """The demo's pruned model (lm pruned in place) with its record and prune seconds. The checkpoint is kept under
    ``cache``, keyed by the prune config, the calibration text and the model, so that a second run with other
    budgets does not prune again (the seconds are then the first run's)."""
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models import load
    from edgeprune.prune import prune_model

    text = json.dumps([asdict(cfg), calib.sha256, model],
                      sort_keys=True, default=str)
    path = cache / hashlib.sha256(text.encode()).hexdigest()[:16]
    if (path / "manifest.json").is_file():
        fields = json.loads((path / "manifest.json").read_text())
        print(f"pruned model from {path} (cached; delete it to prune again)", flush=True)
        return load(str(path)), fields["record"], fields["prune_seconds"]
    t0 = time.perf_counter()
    record = prune_model(lm, cfg, calib)
    seconds = time.perf_counter() - t0
    save_checkpoint(lm, path, {"record": record, "prune_seconds": seconds})
    return lm, record, seconds


def replace_steps(prune_cfg, steps: int, lr: float | None = None):
    """The demo's RecoveryConfig with ``steps`` (and ``lr``) instead of its own."""
    return replace(prune_cfg, recover_steps=steps, recover_lr=lr or prune_cfg.recover_lr).recovery()


if __name__ == "__main__":
    main()
