"""Which gradient term streaming uses: PPL at 20% of the default model pruned three ways.

- ``memory``: the in-memory path, PIEM with its exact Taylor term (a whole-model backward pass). This is also what
  accelerate's ``device_map`` with CPU/disk offload computes (offloading moves weights, not the math), at the cost
  of reading every offloaded weight from disk twice per calibration micro-batch;
- ``stream-lens``: streamed, Taylor term from the layer-local logit-lens loss (stream_prune.lens_gradients);
- ``stream-none``: streamed, PIEM without the Taylor term.

Recipe: PIEM + LSPS (Block Influence), one round, 32 calibration windows of 128 tokens from WikiText-2 valid, no
refit, no distillation; PPL on the first 8,192 tokens of WikiText-2 test (seq 128). Each pruning runs in its own
process (peak RSS: its VmHWM). Writes bench/results/stream_gradient.json and prints a markdown table.

    .venv/bin/python bench/stream_gradient.py [--data ../shared/data] [--ratio 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMALL_GRID_TOKENS, data_dir, load_result, save  # noqa: E402

CHILD = """
import json, sys, time

def hwm_mib():  # this process's own peak RSS: getrusage would include the spawning parent's (vfork + exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

from edgeprune.data import load_text
from edgeprune.prune import PruneConfig
mode, out, calib, ratio = sys.argv[1:5]
cfg = PruneConfig(ratio=float(ratio), scorer="piem", allocator="lsps", sensitivity="bi", n_samples=32, seq_len=128)
text = load_text(calib, "calib")
t = time.perf_counter()
if mode == "memory":
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models import load
    from edgeprune.prune import prune_model
    lm = load("default")
    rec = prune_model(lm, cfg, text, progress=False)
    save_checkpoint(lm, out, {})
else:
    from edgeprune.stream_prune import stream_prune
    rec = stream_prune("default", cfg, text, out, gradient=mode.removeprefix("stream-"), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mib": hwm_mib(),
                  "layer_shapes": rec["layer_shapes"]}))
"""


def run(mode: str, out: Path, calib: str, ratio: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(out), calib, str(ratio)], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ppl(model_dir: Path, data: Path) -> float:
    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load

    lm = load(str(model_dir))
    return perplexity(lm.model, lm.tokenizer, load_text(str(data / "wikitext-2" / "wiki.test.raw"), "eval"),
                      seq_len=128, max_tokens=SMALL_GRID_TOKENS, progress=False)["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--modes", default="memory,stream-lens,stream-none",
                    help="a subset replaces those rows in the saved result and keeps the others")
    args = ap.parse_args()
    data = data_dir(args.data)
    calib = str(data / "wikitext-2" / "tokens" / "valid.txt")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            res = run(mode, Path(tmp) / mode, calib, args.ratio)
            res["ppl"] = ppl(Path(tmp) / mode, data)
            rows.append({"mode": mode, **res, "load_average": os.getloadavg()})
            print(f"{mode}: PPL {res['ppl']:.2f}, {res['seconds']:.0f} s, peak RSS {res['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr)
    old = load_result("stream_gradient") or {"rows": []}
    rows = [r for r in old["rows"] if r["mode"] not in {x["mode"] for x in rows}] + rows
    for r in rows:
        r.setdefault("load_average", os.getloadavg())
    result = {"ratio": args.ratio, "eval_tokens": SMALL_GRID_TOKENS, "rows": rows}
    save("stream_gradient", result)
    print(f"| gradient term | PPL at {args.ratio:.0%} | prune seconds | peak RSS MiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['ppl']:.2f} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
