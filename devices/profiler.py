"""On-device profiler for an ONNX or GGUF artifact. Runs on the device: imports the standard library, numpy, psutil
and one runtime (onnxruntime + tokenizers for ONNX, llama-cpp-python for GGUF) — never torch or transformers.

Measures load time, prefill latency and time to first token at several prompt lengths, decode tokens/s and
per-token latency (p50/p95), peak resident memory and the artifact's size, with warm-up runs and medians over
repeats, and writes one JSON document that also records the machine, the runtime versions, the execution
provider and the sha256 of the artifact's manifest. Before loading anything it checks that the artifact plus
its runtime fit the memory budget, and refuses (exit code 2, one line on stderr) when they do not.

Three ways to run it, same code:

    edgeprune profile ARTIFACT_DIR --device cpu [--json PATH]       # host CLI (runs this in a subprocess)
    python -m edgeprune.devices.profiler ARTIFACT_DIR [options]
    python profiler.py ARTIFACT_DIR [options]                        # on a device: this file + its siblings
                                                                     # (ship.CODE_FILES, as a bundle has them)

Device-side install: ``pip install numpy psutil llama-cpp-python`` (GGUF) and/or
``pip install numpy psutil onnxruntime tokenizers`` (ONNX; ``onnxruntime-gpu`` on Jetson).

The parts, each a sibling module shipped with this one: ``artifact_info.py`` (what the artifact is),
``memory_check.py`` (the budget check before loading), ``machine.py`` (the machine, versions, resident memory) and
``timing.py`` (the runtime backends and the measurements). This module runs them in order and writes the
document; the names other code reads from here (``model_shape``, ``memory_check_for``, ...) are re-exported.
It does not ship anything or choose a device's settings (``ship.py``, ``profiles.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _sibling(name: str):
    """Import a sibling device module, whether this file runs inside edgeprune or alone in a bundle."""
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # run through runpy/exec rather than `python profiler.py`
        sys.path.insert(0, here)
    return importlib.import_module(name)


_art, _machine, _memory, _timing = (_sibling(m) for m in ("artifact_info", "machine", "memory_check", "timing"))
# what profile() uses, and the names ship.py, remote.py, fit/ and the tests read from here
ProfileError, artifact_format, artifact_info, model_shape = (_art.ProfileError, _art.artifact_format,
                                                             _art.artifact_info, _art.model_shape)
MiB, machine_info, rss_mb, peak_rss_mb = _machine.MiB, _machine.machine_info, _machine.rss_mb, _machine.peak_rss_mb
DEFAULT_DECODE_PROMPT, estimate_memory, estimate_memory_for = (_memory.DEFAULT_DECODE_PROMPT, _memory.estimate_memory,
                                                               _memory.estimate_memory_for)
check_memory, resolve_budget, plan_context, memory_check_for = (_memory.check_memory, _memory.resolve_budget,
                                                                _memory.plan_context, _memory.memory_check_for)

SCHEMA = "edgeprune.profile/1"
DEFAULT_PROMPT_LENGTHS = (32, 128, 512)
DEFAULT_NEW_TOKENS = 64


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def resolve_threads(x) -> int | None:
    """None/"" (the runtime's default), "auto" (the physical cores) or a positive integer."""
    if x in (None, "", 0, "0"):
        return None
    if str(x).lower() == "auto":
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        n = int(x)
    except (TypeError, ValueError):
        raise ProfileError(f"threads must be a positive integer or 'auto', not {x!r}") from None
    if n < 1:
        raise ProfileError("threads must be at least 1")
    return n


def profile(artifact, *, device: str | None = None, threads=None, providers=None, n_gpu_layers: int = 0,
            prompt_lengths=DEFAULT_PROMPT_LENGTHS, new_tokens: int = DEFAULT_NEW_TOKENS,
            decode_prompt: int | None = None, warmup: int = 1, repeats: int = 5, memory_budget_mb=None,
            seed: int = 0, quiet: bool = False) -> dict:
    """Profile one artifact; returns the JSON document (schema ``edgeprune.profile/1``, see the README)."""
    import numpy as np

    start = time.perf_counter()
    path = Path(artifact)
    info = artifact_info(path)
    fmt = info["format"]
    if repeats < 1 or warmup < 0 or new_tokens < 1:
        raise ProfileError("--repeats and --new-tokens must be at least 1, --warmup at least 0")
    shape = model_shape(path)
    limit = int(shape["context"]) if shape.get("context") else None
    lengths, skipped, decode_prompt, n_ctx = plan_context(prompt_lengths, new_tokens, decode_prompt, limit)
    budget = resolve_budget(memory_budget_mb)
    memory_check = check_memory(estimate_memory(path, n_ctx, lengths[-1], info), budget, device)
    threads = resolve_threads(threads)
    machine = machine_info()
    rss_before = rss_mb()
    _log(quiet, f"profiling {info['name']} ({fmt} {info['dtype'] or ''}, {info['size_bytes'] / MiB:.1f} MiB): "
                f"prompts {lengths}, {new_tokens} new tokens, {warmup} warm-up + {repeats} repeats")
    t0 = time.perf_counter()
    if fmt == "onnx":
        backend = _timing.OrtBackend(path, threads, list(providers) if providers else None)
    else:
        backend = _timing.LlamaBackend(path, threads, int(n_gpu_layers or 0), n_ctx, min(512, n_ctx))
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    vocab = int(shape["vocab"] or 0) or (backend.gen.n_vocab if fmt == "gguf" else 0)
    if not vocab:
        backend.prefill([0])
        vocab = int(backend._logits.shape[-1])
    rng = np.random.default_rng(seed)
    _log(quiet, f"loaded in {load_s:.2f} s with {backend.execution_provider}; measuring prefill")
    prefill = _timing.measure_prefill(backend, lengths, vocab, warmup, repeats, rng)
    for row in prefill:
        _log(quiet, f"  prompt {row['prompt_tokens']:>5}: prefill {row['prefill_ms']:.1f} ms, "
                    f"TTFT {row['ttft_ms']:.1f} ms")
    decode = _timing.measure_decode(backend, decode_prompt, new_tokens, vocab, warmup, repeats, rng)
    _log(quiet, f"  decode: {decode['tokens_per_s']} tokens/s, p50 {decode['ms_per_token_p50']} ms, "
                f"p95 {decode['ms_per_token_p95']} ms")
    peak, source = peak_rss_mb()
    if hasattr(os, "getloadavg"):
        machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    warnings = []
    loads = [max(machine.get("load_avg") or [0]), max(machine.get("load_avg_end") or [0])]
    cores = machine.get("logical_cores") or 1
    if max(loads) > 0.75 * cores:
        warnings.append(f"the machine was busy (load average up to {max(loads):.1f} on {cores} cores): the "
                        f"timings include contention with other processes")
    if machine["emulated"]:
        warnings.append(f"EMULATED: measured under {machine['emulation']['emulator']}; these timings are not "
                        f"{machine['arch']} device timings (only functional results carry over)")
    if skipped:
        warnings.append(f"prompt lengths {skipped} exceed the model's context of {limit} tokens and were skipped")
    runtime = backend.describe()
    runtime["versions"] = _machine.versions(["numpy", "psutil", "tokenizers", "onnxruntime", "llama_cpp"])
    backend.close()
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device,
        "arch": machine["arch"],
        "emulated": machine["emulated"],  # True: timings from an emulator, not from the device
        "artifact": info,
        "machine": machine,
        "runtime": runtime,
        "settings": {"prompt_lengths": lengths, "skipped_prompt_lengths": skipped, "new_tokens": new_tokens,
                     "decode_prompt_tokens": decode_prompt, "warmup": warmup, "repeats": repeats, "seed": seed,
                     "n_ctx": n_ctx, "model_context": limit},
        "memory_check": memory_check,
        "load_s": round(load_s, 4),
        "prefill": prefill,
        "decode": decode,
        "memory": {"rss_before_load_mb": round(rss_before, 1), "rss_after_load_mb": round(rss_loaded, 1),
                   "peak_rss_mb": None if peak is None else round(peak, 1), "peak_rss_source": source,
                   "rss_end_mb": round(rss_mb(), 1)},
        "warnings": warnings,
        "seconds": round(time.perf_counter() - start, 2),
    }


def write_json(path, data: dict) -> None:
    """Atomic write (temp file + rename), so a reader never sees half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="profiler.py", description="Profile an ONNX or GGUF artifact on this device "
                                 "(load, prefill, TTFT, decode tokens/s, latency percentiles, peak RSS).")
    ap.add_argument("artifact", help="artifact directory (model.onnx or model.gguf + tokenizer + manifest.json)")
    ap.add_argument("--device", help="device profile name, recorded in the output")
    ap.add_argument("--threads", help="runtime threads (default: the runtime's choice)")
    ap.add_argument("--providers", help="onnxruntime execution providers, comma-separated, in order of preference")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="llama.cpp layers to offload to the GPU (-1: all)")
    ap.add_argument("--prompt-lengths", type=_int_list, default=list(DEFAULT_PROMPT_LENGTHS))
    ap.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="decode steps per repeat")
    ap.add_argument("--decode-prompt", type=int, help=f"prompt tokens before decoding (default {DEFAULT_DECODE_PROMPT})")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-budget", default=None, help="MiB or 'auto' (80%% of RAM); refuse when the artifact "
                    "would not fit (default: no check)")
    ap.add_argument("--check-only", action="store_true", help="only run the memory check, print it as JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", help="write the result here (default: print it on stdout)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check_only:
            result = memory_check_for(args.artifact, args.prompt_lengths, args.new_tokens, args.decode_prompt,
                                      args.memory_budget, args.device)
        else:
            providers = [p for p in (args.providers or "").split(",") if p] or None
            result = profile(args.artifact, device=args.device, threads=args.threads, providers=providers,
                             n_gpu_layers=args.n_gpu_layers, prompt_lengths=args.prompt_lengths,
                             new_tokens=args.new_tokens, decode_prompt=args.decode_prompt, warmup=args.warmup,
                             repeats=args.repeats, memory_budget_mb=args.memory_budget, seed=args.seed,
                             quiet=args.quiet)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json_path:
        write_json(args.json_path, result)
        _log(args.quiet, f"wrote {args.json_path}")
    else:
        print(json.dumps(result, indent=2))
    return 0


# re-exported: ship.py, remote.py, fit/ and the tests read these from here
__all__ = ["DEFAULT_DECODE_PROMPT", "MiB", "ProfileError", "artifact_format", "artifact_info", "check_memory",
           "estimate_memory", "estimate_memory_for", "machine_info", "memory_check_for", "model_shape", "plan_context",
           "profile", "resolve_budget", "resolve_threads", "write_json"]


if __name__ == "__main__":
    sys.exit(main())
