"""Memory prediction of `edgeprune fit` vs the profiler's measured peak RSS on this CPU. For each artifact
directory: the prediction from the *source checkpoint's shapes* and the dtype alone (no artifact file read:
`edgeprune.fit.memory.predict_memory`, i.e. the profiler's own estimate on a predicted artifact), and the peak
RSS the device profiler measures with the `cpu` profile's own settings (prompt lengths, decode steps, warm-up and
repeats: what `edgeprune profile --device cpu` measures; 1 thread). Writes bench/results/fit_memory.json and
prints a table.

    python bench/fit_memory.py artifacts/default-gguf-q8_0 artifacts/default-onnx-int8 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", help="artifact directories (exported by edgeprune from a checkpoint)")
    ap.add_argument("--calibration", default="", help="comma-separated names of the artifacts the constants were "
                    "fitted on (marked in the table)")
    args = ap.parse_args()

    from edgeprune.devices import profiles, ship

    from edgeprune.fit.memory import predict_memory, profile_settings
    from edgeprune.fit.shapes import file_bytes, from_checkpoint

    prof = profiles.load("cpu")
    settings = profile_settings(prof)
    calib = set(filter(None, args.calibration.split(",")))
    rows = []
    for a in args.artifacts:
        art = Path(a)
        man = json.loads((art / "manifest.json").read_text())
        fmt = man.get("format") or ("gguf" if (art / "model.gguf").is_file() else "onnx")
        dtype = man["dtype"]
        src = Path(man["source"])
        shape = from_checkpoint(src if src.is_absolute() or src.exists() else ROOT / src)
        pred = predict_memory(shape, fmt, dtype, settings)
        doc = ship.profile_local(art, prof, {"threads": 1}, quiet=True)
        peak = doc["memory"]["peak_rss_mb"]
        size = doc["artifact"]["model_bytes"]
        rows.append({"artifact": art.name, "format": fmt, "dtype": dtype, "calibration": art.name in calib,
                     "predicted_file_mb": round(file_bytes(shape, fmt, dtype) / 2**20, 2),
                     "file_mb": round(size / 2**20, 2), "predicted_mb": pred["expected_mb"],
                     "check_mb": pred["estimate_mb"], "peak_rss_mb": peak,
                     "error": round(pred["expected_mb"] / peak - 1, 4), "parts_mb": pred["parts_mb"],
                     "load_avg": doc["machine"]["load_avg"]})
        print(rows[-1], flush=True)
    settings = {**settings, "warmup": prof.warmup, "repeats": prof.repeats, "threads": 1}
    save("fit_memory", {"schema": "edgeprune.bench-fit-memory/1", "settings": settings, "rows": rows})
    print("| artifact | file MiB predicted / actual | peak RSS MiB predicted | measured | error |")
    print("|---|---|---|---|---|")
    for r in rows:
        mark = " (calibration)" if r["calibration"] else ""
        print(f"| {r['artifact']}{mark} | {r['predicted_file_mb']:.1f} / {r['file_mb']:.1f} | {r['predicted_mb']:.1f} | "
              f"{r['peak_rss_mb']:.1f} | {r['error']:+.1%} |")


if __name__ == "__main__":
    main()
