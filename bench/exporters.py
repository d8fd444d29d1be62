"""The ONNX exporter choice (issue 13, "Export at scale"): edgeprune's TorchScript trace without parameters
(`export/onnx_trace.py`, the weights written tensor by tensor) against torch's dynamo exporter
(`torch.onnx.export(dynamo=True)`, torch.export + onnxscript) on the same wrapper, inputs and dynamic axes.
Each exporter runs in its own process on a freshly loaded model: wall seconds of the export call, peak RSS
(VmHWM) after it, the file size, and the largest |logit| difference to PyTorch in onnxruntime on the trace's own
inputs (a left-padded batch with a past). Writes bench/results/exporters.json and prints a table.

    python bench/exporters.py [--model default]

The dynamo exporter needs `onnxscript` (not an edgeprune dependency):
    pip install --target /tmp/dynpkgs --no-deps onnxscript onnx_ir ml_dtypes
    PYTHONPATH=/tmp/dynpkgs python bench/exporters.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

MODES = ("torchscript", "dynamo")


def _inputs(lm):
    """The trace's inputs, names and dynamic axes (as export/onnx_trace.trace_fp32 builds them)."""
    import edgeprune.export.onnx_trace as T
    import torch

    kv_layers, kv_heads = T._kv_layout(lm)
    b, s, p = 2, 7, 5
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.model.config.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    past = []
    for h in kv_heads:
        past += [torch.randn(b, h, p, lm.adapter.head_dim, generator=g) for _ in range(2)]
    names = T._io_names(kv_layers)
    return kv_layers, (ids, mask, pos, *past), names


def one(mode: str, model: str, out: Path) -> dict:
    import edgeprune.export.onnx_trace as T
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeprune.models import load

    lm = load(model)
    lm.model.config.use_cache = True
    kv_layers, args, (in_names, out_names) = _inputs(lm)
    wrapper = T._wrapper(lm.model, kv_layers, lm.adapter.spec)
    with torch.no_grad():
        ref = wrapper(*args)[0].numpy()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    path = out / "model.onnx"
    if mode == "torchscript":
        T.trace_fp32(lm, path)
    else:
        dyn = torch.export.Dim.DYNAMIC
        shapes = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn}, tuple({0: dyn, 2: dyn} for _ in args[3:]))
        with torch.no_grad(), T._traceable_rope(lm.adapter.spec):
            torch.onnx.export(wrapper, args, str(path), dynamo=True, input_names=in_names, output_names=out_names,
                              dynamic_shapes=shapes, opset_version=18, external_data=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del lm, wrapper
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip(in_names, (a.numpy() for a in args), strict=True))
    got = sess.run(None, feeds)[0]
    size = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    return {"mode": mode, "export_s": round(seconds, 1), "peak_rss_mib_after_export": round(peak),
            "rss_mib_before_export": round(rss_before), "size_mib": round(size / 2**20, 1),
            "max_abs_logit_diff": float(np.abs(got - ref).max()), "load_avg": list(os.getloadavg())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(one(args.one, args.model, Path(args.out))), flush=True)
        return
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        sys.exit("error: the dynamo exporter needs onnxscript (see this script's --help for a throwaway install)")
    rows = []
    for mode in MODES:
        with tempfile.TemporaryDirectory() as tmp:
            p = subprocess.run([sys.executable, __file__, "--one", mode, "--model", args.model, "--out", tmp],
                               capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("ROW ")), None)
            if line is None:
                sys.exit(f"error: {mode} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
            rows.append(json.loads(line[4:]))
            print(rows[-1], flush=True)
    save("exporters", {"schema": "edgeprune.bench-exporters/1", "model": args.model, "rows": rows})
    print("| exporter | export s | peak RSS MiB after export (before) | file MiB | max abs logit diff | load |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['export_s']} | {r['peak_rss_mib_after_export']} ({r['rss_mib_before_export']}) | "
              f"{r['size_mib']} | {r['max_abs_logit_diff']:.2g} | {r['load_avg'][0]:.1f} |")


if __name__ == "__main__":
    main()
