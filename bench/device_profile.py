"""Profile dense and pruned artifacts on this CPU with the device profiler (the same code that runs on a device:
`edgeprune profile ARTIFACT --device cpu`). Writes bench/results/profile.json; rows are merged by label, so a run
with --only replaces just those rows.

    python bench/device_profile.py                                  # dense and pruned-20 x gguf q8_0, onnx int8
    python bench/device_profile.py --only dense-gguf-q8_0           # one row (its artifact is exported if missing)
    python bench/device_profile.py --formats gguf:q8_0,gguf:f16,onnx:int8,onnx:fp32 --repeats 5
    python bench/device_profile.py --artifact mine=artifacts/x ...  # any artifact directories, LABEL=DIR

Missing artifacts are built with the CLI: the dense model is `default`; pruned-R is `edgeprune prune default
--ratio R --scorer piem --allocator lsps --sensitivity bi` calibrated on WikiText-2 valid (or the built-in text when
the data is absent), saved under out/bench/. Each profile runs in a fresh process (peak RSS is the runtime's own).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_DATA, ROOT, load_result, save

VARIANTS = {"dense": None, "pruned-20": 0.2}
DEFAULT_FORMATS = "gguf:q8_0,onnx:int8"


def edgeprune(*args: str) -> None:
    cmd = [sys.executable, "-m", "edgeprune", *args]
    print("+ edgeprune " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def checkpoint(variant: str, data: Path) -> str:
    ratio = VARIANTS[variant]
    if ratio is None:
        return "default"
    out = ROOT / "out" / "bench" / variant
    if not (out / "manifest.json").is_file():
        calib = data / "wikitext-2" / "tokens" / "valid.txt"
        edgeprune("prune", "default", "--ratio", str(ratio), "--scorer", "piem", "--allocator", "lsps",
                  "--sensitivity", "bi", "--rounds", "1", "--no-reconstruct", "--calib", str(calib) if calib.is_file() else "builtin", "-o", str(out))
    return str(out)


def artifact(variant: str, fmt: str, dtype: str, data: Path, build: bool) -> Path | None:
    name = "default" if variant == "dense" else variant
    path = ROOT / "artifacts" / f"{name}-{fmt}-{dtype}"
    if (path / "manifest.json").is_file():
        return path
    if not build:
        print(f"skipping {variant} {fmt} {dtype}: {path} is missing (--no-build)", flush=True)
        return None
    edgeprune("export", checkpoint(variant, data), "--format", fmt, "--dtype", dtype, "-o", str(path))
    return path


def row(label: str, variant: str, path: Path, doc: dict) -> dict:
    pre = {str(r["prompt_tokens"]): r for r in doc["prefill"]}
    return {"label": label, "variant": variant, "format": doc["artifact"]["format"], "dtype": doc["artifact"]["dtype"],
            "artifact": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
            "size_mb": round(doc["artifact"]["size_bytes"] / 2**20, 2),
            "model_mb": round(doc["artifact"]["model_bytes"] / 2**20, 2),
            "load_s": doc["load_s"], "peak_rss_mb": doc["memory"]["peak_rss_mb"],
            "prefill_ms": {k: r["prefill_ms"] for k, r in pre.items()},
            "prefill_tokens_per_s": {k: r["prefill_tokens_per_s"] for k, r in pre.items()},
            "ttft_ms": {k: r["ttft_ms"] for k, r in pre.items()},
            "decode_tokens_per_s": doc["decode"]["tokens_per_s"],
            "decode_ms_p50": doc["decode"]["ms_per_token_p50"], "decode_ms_p95": doc["decode"]["ms_per_token_p95"],
            "threads": doc["runtime"].get("threads"), "execution_provider": doc["runtime"]["execution_provider"],
            "load_avg": [doc["machine"].get("load_avg"), doc["machine"].get("load_avg_end")],
            "warnings": doc.get("warnings", []),
            "profile": doc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help="comma-separated FORMAT:DTYPE")
    ap.add_argument("--only", help="comma-separated row labels (VARIANT-FORMAT-DTYPE), e.g. dense-gguf-q8_0")
    ap.add_argument("--artifact", action="append", default=[], help="LABEL=DIR: profile this artifact too")
    ap.add_argument("--device", default="cpu", help="device profile for the settings (default cpu)")
    ap.add_argument("--threads", help="override the profile's threads")
    ap.add_argument("--repeats", type=int, help="override the profile's repeats")
    ap.add_argument("--prompt-lengths", help="override the profile's prompt lengths, e.g. 32,128,512")
    ap.add_argument("--new-tokens", type=int, help="override the profile's decode steps")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="data directory (calibration text for pruning)")
    ap.add_argument("--no-build", action="store_true", help="profile only artifacts that exist")
    args = ap.parse_args()

    from edgeprune.devices import profiles, ship

    prof = profiles.load(args.device)
    overrides = {"threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
                 "prompt_lengths": [int(x) for x in args.prompt_lengths.split(",")] if args.prompt_lengths else None}
    only = set(args.only.split(",")) if args.only else None
    jobs: list[tuple[str, str, str, str, Path | None]] = []  # label, variant, format, dtype, directory
    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in VARIANTS:
            sys.exit(f"error: unknown variant {variant}; choose from {', '.join(VARIANTS)}")
        for spec in args.formats.split(","):
            fmt, _, dtype = spec.partition(":")
            label = f"{variant}-{fmt}-{dtype}"
            if only is None or label in only:
                jobs.append((label, variant, fmt, dtype, None))
    for spec in args.artifact:
        label, _, d = spec.partition("=")
        jobs.append((label, "custom", "", "", Path(d).resolve()))

    result = load_result("profile") or {}
    rows = {r["label"]: r for r in result.get("rows", [])}
    data = Path(args.data)
    for label, variant, fmt, dtype, path in jobs:
        if path is None:
            path = artifact(variant, fmt, dtype, data, not args.no_build)
            if path is None:
                continue
        print(f"profiling {label}: {path}", flush=True)
        doc = ship.profile_local(path, prof, overrides)
        rows[label] = row(label, variant, path, doc)
        for line in ship.summary(doc):
            print("  " + line, flush=True)
        result = {"schema": "edgeprune.bench-profile/1", "date": time.strftime("%Y-%m-%d"), "device": prof.name,
                  "machine": doc["machine"], "settings": doc["settings"],
                  "rows": sorted(rows.values(), key=lambda r: r["label"])}
        save("profile", result)  # after every row, so an interrupted run keeps what it measured
    print(f"wrote {Path('bench/results/profile.json')}", flush=True)


if __name__ == "__main__":
    main()
