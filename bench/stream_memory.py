"""Where the streamed prune's memory goes: the peak RSS of ``stream_prune`` phase by phase.

Model: bench/scale.py's random-initialised Qwen2.5-0.5B-shaped Llama checkpoint (24 layers of 14.9M parameters,
a 136M-parameter tied embedding), written once under --models. Recipe: bench/scale.py's (PIEM + LSPS with Block
Influence, ratio 0.2, one round, 8 x 128 tokens of the built-in text, no refit), the streamed gradient term
``lens``. The run is one child process; it resets its VmHWM (``/proc/self/clear_refs``, Linux) on entering each
phase and records the phase's peak above its entry RSS (max over layers), the largest entry RSS (what stays
resident between passes) and the process's overall peak.

    .venv/bin/python bench/stream_memory.py [--dtype bfloat16] [--label after]

Writes bench/results/stream_memory.json (one entry per --label; run it at an older commit with another label to
compare). It does not measure time (the seconds are wall clock on a shared machine, printed with the load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save  # noqa: E402

CHILD = r"""
import json, sys, time

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024

PEAK, PH = [0.0], {}

def reset():
    PEAK[0] = max(PEAK[0], status("VmHWM:"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def wrap(owner, name, label=None):
    fn = getattr(owner, name)
    def w(*a, **k):
        reset()
        rss0 = status("VmRSS:")
        try:
            return fn(*a, **k)
        finally:
            hwm = status("VmHWM:")
            p = PH.setdefault(label or name, {"calls": 0, "above_entry_mib": 0.0, "entry_mib": 0.0})
            p["calls"] += 1
            p["above_entry_mib"] = max(p["above_entry_mib"], hwm - rss0)
            p["entry_mib"] = max(p["entry_mib"], rss0)
            reset()
    setattr(owner, name, w)

import tempfile
import edgeprune.scoring.base as base
import edgeprune.scoring.scorers as scorers
import edgeprune.stream_prune as sp
import edgeprune.streaming as streaming
from edgeprune.data import load_text
from edgeprune.prune import PruneConfig

imports = status("VmRSS:")
for name in ("capture_layer0_inputs", "lens_gradients", "collect_layer_stats", "reconstruct_layer"):
    if hasattr(sp, name):
        wrap(sp, name)
wrap(base, "outlier_ratio")
wrap(scorers.PIEMScorer, "score_layer", "piem_score_layer")
wrap(streaming.StreamedModel, "_materialise", "materialise_layer")
wrap(streaming.LayerShardWriter, "add", "write_shard")
src, dtype, tmp = sys.argv[1:4]
cfg = PruneConfig(ratio=0.2, scorer="piem", allocator="lsps", sensitivity="bi", n_samples=8, seq_len=128, rounds=1,
                  reconstruct=False)
t = time.perf_counter()
with tempfile.TemporaryDirectory(dir=tmp) as d:
    sp.stream_prune(src, cfg, load_text("builtin", "calib"), d + "/out", dtype=dtype, gradient="lens",
                    progress=False)
reset()
print(json.dumps({"seconds": time.perf_counter() - t, "rss_after_imports_mib": imports, "peak_mib": PEAK[0],
                  "phases": PH}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--label", default="now")
    ap.add_argument("--models", type=Path, default=Path("out/scale-models"))
    args = ap.parse_args()
    from scale import make_random, params_of

    src = make_random("0.5b", args.models / f"0.5b-{args.dtype}", args.dtype)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), args.dtype, str(args.models)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(model="0.5b", dtype=args.dtype, load_average=os.getloadavg()[0], **params_of(src))
    old = json.loads((RESULTS / "stream_memory.json").read_text()) if (RESULTS / "stream_memory.json").is_file() \
        else {}
    old[args.label] = res
    save("stream_memory", old)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
