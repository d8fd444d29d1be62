"""Peak memory of scoring (PIEM: gradient pass + layer-by-layer statistics) on the default model, with the
gradient term computed three ways, and what the per-micro-batch sum does to the 20% plan.

    .venv/bin/python bench/score_memory.py [--data DIR] [--n-samples 32] [--no-plan]

- ``full``: today's reference, a float32 gradient of every decoder weight summed over the micro-batches, then
  |w * g| per unit (scoring.calibration.accumulate_gradients);
- ``hooks``: the gradient folded into per-unit sums by post-accumulate-grad hooks and freed at once;
- ``hooks+ckpt``: the same with the decoder layers checkpointed (the default).

Each row runs in its own process; the peak is sampled every 5 ms during ``score_model`` (RSS, psutil) and the
model's own bytes are subtracted for the "above model" column. With --plan (default) the full and the default
gradient paths also prune the model 20% (PIEM + LSPS, bi sensitivity, one round) and are compared by plan and
WikiText-2 PPL (first 8,192 test tokens). Writes bench/results/score_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from common import DEFAULT_DATA, data_dir, save

MODES = ("full", "hooks", "hooks+ckpt")


def _patch(mode: str) -> None:
    import functools

    import edgeprune.scoring.gradients as g
    from edgeprune.scoring.calibration import accumulate_gradients

    if mode == "full":
        g.unit_taylor = lambda adapter, batches, micro_batch=4, progress=True: accumulate_gradients(
            adapter, batches, micro_batch=micro_batch, progress=progress)
    elif mode == "hooks":
        g.unit_taylor = functools.partial(g.unit_taylor, checkpointing=False)


class PeakRSS:
    def __init__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, False

    def __enter__(self):
        def run():
            while not self.stop:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.005)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def one(mode: str, dtype: str, data: str, n_samples: int, plan: bool) -> dict:
    import gc

    import psutil

    from edgeprune.data import calibration_batches, load_text
    from edgeprune.models import load
    from edgeprune.scoring import make_scorer, score_model

    _patch(mode)
    lm = load("default", dtype=dtype)
    calib = load_text(f"{data}/wikitext-2/tokens/valid.txt", "calib")
    batches = calibration_batches(lm.tokenizer, calib, n_samples, 128, 0)
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    gc.collect()
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with PeakRSS() as peak:
        score_model(lm.adapter, make_scorer("piem"), batches, progress=False, block_stats=True)
    row = {"mode": mode, "dtype": dtype, "model_mib": model_bytes / 2**20, "rss_before_mib": before / 2**20,
           "peak_mib": peak.peak / 2**20, "score_seconds": time.perf_counter() - start}
    if plan:
        from edgeprune.evaluate.ppl import perplexity
        from edgeprune.prune import PruneConfig, prune_model

        cfg = PruneConfig(0.2, scorer="piem", allocator="lsps", sensitivity="bi", round_to=32, n_samples=n_samples)
        record = prune_model(lm, cfg, calib, progress=False)
        test = load_text(f"{data}/wikitext-2/wiki.test.raw", "eval")
        row["plan"] = record["plan"]["layers"]
        row["ppl"] = perplexity(lm.model, lm.tokenizer, test, seq_len=128, max_tokens=8192, progress=False)["ppl"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--no-plan", action="store_true")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = str(data_dir(args.data))
    if args.one:
        mode, dtype = args.one
        plan = not args.no_plan and dtype == "float32" and mode in ("full", "hooks+ckpt")
        print(json.dumps(one(mode, dtype, data, args.n_samples, plan)))
        return
    rows = []
    for mode, dtype in [(m, "float32") for m in MODES] + [("full", "bfloat16"), ("hooks+ckpt", "bfloat16")]:
        cmd = [sys.executable, __file__, "--one", mode, dtype, "--data", data, "--n-samples", str(args.n_samples)]
        out = subprocess.run(cmd + (["--no-plan"] if args.no_plan else []), check=True, capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"default model, score_model(piem, block_stats) on {args.n_samples} x 128 calibration tokens; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| gradient term | dtype | model MiB | RSS before MiB | peak MiB | peak above model load MiB | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['dtype']} | {r['model_mib']:.0f} | {r['rss_before_mib']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['peak_mib'] - r['rss_before_mib']:.0f} | {r['score_seconds']:.0f} |")
    planned = {r["mode"]: r for r in rows if "plan" in r}
    if len(planned) == 2:
        a, b = planned["full"], planned["hooks+ckpt"]
        same = sum(len(set(x[k]) & set(y[k])) for x, y in zip(a["plan"], b["plan"], strict=True)
                   for k in ("heads", "channels"))
        total = sum(len(x[k]) for x in a["plan"] for k in ("heads", "channels"))
        print(f"20% piem + lsps: kept units in common {same}/{total}; PPL full-gradient {a['ppl']:.2f}, "
              f"per-micro-batch hooks {b['ppl']:.2f}")
    common = None
    if len(planned) == 2:
        common = [same, total]
    for r in rows:  # the result file keeps the kept widths, not every kept index
        if "plan" in r:
            r["kept_per_layer"] = [[len(x["heads"]), len(x["channels"])] for x in r.pop("plan")]
    save("score_memory", {"rows": rows, "n_samples": args.n_samples, "units_in_common": common,
                          "loadavg": os.getloadavg()})


if __name__ == "__main__":
    main()
