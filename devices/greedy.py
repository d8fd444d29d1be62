"""Greedy generation for the cross-device parity check: the same artifact, the same prompt, N greedy tokens, and
the top-k logits of every step, so that two machines (x86 here, aarch64 on the device) can be compared token by
token. Runs on the device: standard library, numpy and one runtime (llama-cpp-python or onnxruntime +
tokenizers), like the profiler; shipped in every bundle.

``compare(reference, other)`` says whether the tokens match and, where they do not, the first divergence and the
logit gap there: how far each run's own choice was ahead of the other run's choice. A divergence at a near tie (a
gap within the logit noise the two machines show on the steps where they agree) is a kernel difference (another
accumulation order), not a broken artifact; a large gap is a real difference.

Not here: timing (the profiler) or sampling; EOS is ignored so that every run has exactly N tokens.

    python greedy.py ARTIFACT_DIR [--tokens 32] [--prompt TEXT] [--threads 1]   # prints JSON
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path

SCHEMA = "edgeprune.greedy/1"
PROMPT = "The capital of France is Paris. The three largest cities in Germany are"
TOP_K = 8


def _sibling(name: str):
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def _top(logits, k: int) -> list[list]:
    import numpy as np

    z = np.asarray(logits, dtype=np.float32).reshape(-1)
    idx = np.argpartition(-z, k)[:k]
    idx = idx[np.argsort(-z[idx], kind="stable")]
    return [[int(i), round(float(z[i]), 5)] for i in idx]


def _run_gguf(path: Path, prompt: str, n: int, k: int, threads: int | None):
    gen = _sibling("llama_generate").LlamaGenerator(path, n_ctx=256, threads=threads, n_batch=256)
    try:
        ids = gen.encode(prompt)
        gen.prefill_only(ids)
        tops, tokens = [], []
        for _ in range(n):
            tops.append(_top(gen.logits(), k))
            tokens.append(tops[-1][0][0])
            if len(tokens) < n:
                gen.step(tokens[-1])
        return ids, tokens, tops, {"runtime": "llama.cpp", "version": _version("llama-cpp-python")}
    finally:
        gen.close()


def _run_onnx(path: Path, prompt: str, n: int, k: int, threads: int | None):
    import numpy as np

    gen = _sibling("ort_generate").OrtGenerator(path, threads=threads)
    ids = gen.encode(prompt)
    logits, past = gen.forward(np.array([ids], dtype=np.int64))
    tops, tokens = [], []
    for _ in range(n):
        tops.append(_top(logits[0, -1], k))
        tokens.append(tops[-1][0][0])
        if len(tokens) < n:
            logits, past = gen.forward(np.array([[tokens[-1]]], dtype=np.int64), past=past)
    return ids, tokens, tops, {"runtime": "onnxruntime", "version": _version("onnxruntime")}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run(artifact, prompt: str = PROMPT, tokens: int = 32, top_k: int = TOP_K, threads: int | None = 1) -> dict:
    """Greedy ``tokens`` tokens after ``prompt``; the top-``top_k`` (id, logit) of every step."""
    path = Path(artifact)
    fmt = "gguf" if (path / "model.gguf").is_file() or path.suffix == ".gguf" else "onnx"
    runner = _run_gguf if fmt == "gguf" else _run_onnx
    ids, out, tops, runtime = runner(path, prompt, int(tokens), int(top_k), threads)
    return {"schema": SCHEMA, "format": fmt, "arch": platform.machine(),
            "emulation": _sibling("emulation").detect(), "runtime": runtime, "threads": threads,
            "prompt": prompt, "prompt_ids": [int(i) for i in ids], "tokens": out, "top": tops}


def compare(ref: dict, other: dict) -> dict:
    """Token-by-token comparison of two ``run`` results of the same artifact and prompt.

    ``max_top1_logit_diff``: the largest difference of the chosen token's logit over the steps before the first
    divergence (the logit noise between the two machines). At the first divergence, ``gap_reference`` is how far
    the reference's token was ahead of the other's token in the reference run, ``gap_other`` the same in the other
    run (None when the token was not in that run's top-k: a gap larger than anything recorded)."""
    if ref["prompt_ids"] != other["prompt_ids"]:
        return {"match": False, "error": "the prompts were tokenized differently", "first_divergence": None}
    n = min(len(ref["tokens"]), len(other["tokens"]))
    first = next((i for i in range(n) if ref["tokens"][i] != other["tokens"][i]), None)
    agree = range(n if first is None else first)
    diffs = [abs(ref["top"][i][0][1] - other["top"][i][0][1]) for i in agree]
    out = {"match": first is None and len(ref["tokens"]) == len(other["tokens"]), "steps": n,
           "first_divergence": first, "max_top1_logit_diff": round(max(diffs), 5) if diffs else None,
           "min_margin": round(min(_margin(ref["top"][i]) for i in agree), 5) if diffs else None}
    if first is not None:
        a, b = ref["tokens"][first], other["tokens"][first]
        rt, ot = dict(map(tuple, ref["top"][first])), dict(map(tuple, other["top"][first]))
        out.update(reference_token=a, other_token=b,
                   gap_reference=round(rt[a] - rt[b], 5) if b in rt else None,
                   gap_other=round(ot[b] - ot[a], 5) if a in ot else None)
    return out


def _margin(top: list) -> float:
    return top[0][1] - top[1][1] if len(top) > 1 else float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="greedy.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=TOP_K)
    ap.add_argument("--threads", type=int, default=1, help="runtime threads (fixed, so runs are comparable)")
    args = ap.parse_args(argv)
    try:
        doc = run(args.artifact, args.prompt, args.tokens, args.top_k, args.threads)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
