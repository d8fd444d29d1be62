"""Where the prune's memory goes: the peak RSS of ``stream_prune`` (``--mode stream``) or of ``load`` +
``prune_model`` + ``save_checkpoint`` (``--mode memory``) phase by phase.

Model: one of bench/scale.py's random-initialised Llama checkpoints (default the Qwen2.5-0.5B shape: 24 layers of
14.9M parameters, a 136M-parameter tied embedding), written once under --models. Recipe: bench/scale.py's
(PIEM + LSPS with Block Influence, ratio 0.2, one round, 8 x 128 tokens of the built-in text, the least-squares
refit unless ``--no-refit``), the streamed gradient term ``lens``. The run is one child process; it resets its
VmHWM (``/proc/self/clear_refs``, Linux) on entering and leaving each phase and records the phase's peak above
its entry RSS (max over calls; nested phases fold their peaks into the enclosing ones), the largest entry RSS
(what stays resident between passes), the RSS after the imports (torch, transformers, accelerate, edgeprune and
the Llama modeling code: the baseline that bench/scale.py subtracts) and the process's overall peak (VmHWM over
the whole run). A thread samples RssAnon and RssFile every 10 ms, per phase and overall: safetensors maps tensors
from their files, so part of the RSS is file-backed pages (clean page cache the kernel can drop and re-read under
memory pressure), the rest anonymous memory the process owns.

    .venv/bin/python bench/stream_memory.py [--mode stream|memory] [--size 0.5b] [--dtype bfloat16] [--label now]

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

PEAK, PH, ACTIVE = [0.0], {}, []
SPLIT = {"anon": 0.0, "file": 0.0}  # sampled peaks of RssAnon / RssFile over the whole run

def split():  # anonymous memory and file-backed pages (safetensors maps tensors from the files) now
    d = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile")))
    return int(d["RssAnon"].split()[0]) / 1024, int(d["RssFile"].split()[0]) / 1024

def sampler():  # VmHWM cannot tell the two apart: sample every 10 ms (a shorter spike can be missed)
    while True:
        anon, file = split()
        SPLIT["anon"], SPLIT["file"] = max(SPLIT["anon"], anon), max(SPLIT["file"], file)
        for frame in list(ACTIVE):
            frame[2], frame[3] = max(frame[2], anon), max(frame[3], file)
        time.sleep(0.01)

import threading
threading.Thread(target=sampler, daemon=True).start()

def reset():  # fold the peak since the last reset into the open phases, then start a new peak
    hwm = status("VmHWM:")
    PEAK[0] = max(PEAK[0], hwm)
    for frame in ACTIVE:
        frame[1] = max(frame[1], hwm)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def wrap(owner, name, label=None):
    fn = getattr(owner, name)
    if getattr(fn, "_wrapped", False):
        return
    def w(*a, **k):
        reset()
        rss0 = status("VmRSS:")
        frame = [rss0, rss0, *split()]
        ACTIVE.append(frame)
        try:
            return fn(*a, **k)
        finally:
            reset()
            del ACTIVE[next(i for i, f in enumerate(ACTIVE) if f is frame)]
            p = PH.setdefault(label or name, {"calls": 0, "above_entry_mib": 0.0, "entry_mib": 0.0,
                                              "peak_mib": 0.0, "anon_peak_mib": 0.0, "file_peak_mib": 0.0})
            p["calls"] += 1
            p["above_entry_mib"] = max(p["above_entry_mib"], frame[1] - rss0)
            p["entry_mib"] = max(p["entry_mib"], rss0)
            p["peak_mib"] = max(p["peak_mib"], frame[1])
            p["anon_peak_mib"] = max(p["anon_peak_mib"], frame[2])
            p["file_peak_mib"] = max(p["file_peak_mib"], frame[3])
    w._wrapped = True
    setattr(owner, name, w)

import tempfile
import torch, transformers, accelerate, safetensors.torch  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401  (what transformers imports lazily for the model)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
import edgeprune.checkpoint as checkpoint
import edgeprune.models as models
import edgeprune.prune as prune
import edgeprune.reconstruct as reconstruct
import edgeprune.scoring.base as base
import edgeprune.scoring.calibration as calibration
import edgeprune.scoring.gradients as gradients
import edgeprune.scoring.scorers as scorers
import edgeprune.stream_prune as sp
import edgeprune.streaming as streaming
from edgeprune.data import load_text
from edgeprune.prune import PruneConfig

imports = status("VmRSS:")
imports_split = split()
for owner, name in [(sp, "capture_layer0_inputs"), (sp, "lens_gradients"), (sp, "collect_layer_stats"),
                    (calibration, "collect_layer_stats"), (sp, "reconstruct_layer"),
                    (reconstruct, "reconstruct_layer"), (gradients, "unit_taylor"), (prune, "score_model"),
                    (prune, "apply_plan_reconstruct"), (base, "outlier_ratio"), (sp, "stream_score"),
                    (sp, "stream_apply")]:
    if hasattr(owner, name):
        wrap(owner, name)
wrap(scorers.PIEMScorer, "score_layer", "piem_score_layer")
wrap(streaming.StreamedModel, "_materialise", "materialise")
wrap(streaming.LayerShardWriter, "add", "write_shard")
mode, src, dtype, tmp, refit = sys.argv[1:6]
cfg = PruneConfig(ratio=0.2, scorer="piem", allocator="lsps", sensitivity="bi", n_samples=8, seq_len=128, rounds=1,
                  reconstruct=refit == "1")
text = load_text("builtin", "calib")
t = time.perf_counter()
with tempfile.TemporaryDirectory(dir=tmp) as d:
    if mode == "stream":
        sp.stream_prune(src, cfg, text, d + "/out", dtype=dtype, gradient="lens", progress=False)
    else:
        wrap(models, "load")
        wrap(checkpoint, "save_checkpoint")
        wrap(prune, "prune_model")
        lm = models.load(src, dtype=dtype)
        prune.prune_model(lm, cfg, text, progress=False)
        checkpoint.save_checkpoint(lm, d + "/out", {})
reset()
print(json.dumps({"seconds": time.perf_counter() - t, "rss_after_imports_mib": imports, "peak_mib": PEAK[0],
                  "anon_after_imports_mib": imports_split[0], "file_after_imports_mib": imports_split[1],
                  "peak_anon_mib": SPLIT["anon"], "peak_file_mib": SPLIT["file"], "phases": PH}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="stream", choices=("stream", "memory"))
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-refit", action="store_true", help="prune without the least-squares refit")
    ap.add_argument("--label", default="now")
    ap.add_argument("--models", type=Path, default=Path("out/scale-models"))
    args = ap.parse_args()
    from scale import make_random, params_of

    src = make_random(args.size, args.models / f"{args.size}-{args.dtype}", args.dtype)
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", CHILD, args.mode, str(src), args.dtype, str(args.models),
                           "0" if args.no_refit else "1"], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    info = params_of(src)
    width = 2 if args.dtype != "float32" else 4
    res.update(model=args.size, mode=args.mode, dtype=args.dtype, refit=not args.no_refit, load_average=load,
               load_average_end=os.getloadavg()[0], model_mib=info["params"] * width / 2**20,
               peak_above_imports_mib=res["peak_mib"] - res["rss_after_imports_mib"], **info)
    old = json.loads((RESULTS / "stream_memory.json").read_text()) if (RESULTS / "stream_memory.json").is_file() \
        else {}
    old[args.label] = res
    save("stream_memory", old)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
