"""Timing a model in its runtime: a small backend per runtime (onnxruntime through ``ort_generate.py``, llama.cpp
through ``llama_generate.py``) with one interface (prefill, first token, one decode step, describe), and the
measurements on it: prefill latency and time to first token per prompt length, decode tokens/s and per-token
latency percentiles, after warm-up runs, medians over repeats. Runs on the device: standard library, numpy and
one runtime, imported when its backend is created.

It does not decide what to measure or check memory first (``profiler.py``), nor describe the machine
(``machine.py``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

if __package__:
    from .artifact_info import ProfileError
    from .machine import versions
else:  # alone in a bundle, beside its sibling modules
    from artifact_info import ProfileError
    from machine import versions


def _runtime_module(name: str):
    """``ort_generate`` / ``llama_generate``, imported only when its backend is created (each imports its runtime)."""
    import importlib

    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None, providers: list[str] | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ProfileError("ONNX artifacts need onnxruntime: pip install onnxruntime numpy psutil tokenizers "
                               "(onnxruntime-gpu on Jetson)") from None
        import numpy as np

        self.np = np
        available = ort.get_available_providers()
        requested = list(providers or ["CPUExecutionProvider"])
        use = [p for p in requested if p in available]
        if "CPUExecutionProvider" not in use:
            use.append("CPUExecutionProvider")
        self.providers_requested, self.providers_available = requested, available
        self.gen = _runtime_module("ort_generate").OrtGenerator(path, providers=use, threads=threads)
        self.providers_used = self.gen.session.get_providers()
        self.execution_provider = self.providers_used[0]
        self.threads = threads
        self._logits = None
        self._past = None
        self.vocab = None

    def prefill(self, ids) -> None:
        # the previous run's outputs go first: held across the next run, its [prompt, vocab] logits were a
        # second copy at the peak (+96 MiB at 512 tokens on SmolLM2; every repeat after the first)
        self._logits = self._past = None
        logits, self._past = self.gen.forward(self.np.array([ids], dtype=self.np.int64))
        self._logits = logits[0, -1].copy()  # the next token's row only; the full logits are released here

    def first_token(self) -> int:
        return int(self._logits.argmax())

    def step(self, token: int) -> int:
        logits, self._past = self.gen.forward(self.np.array([[token]], dtype=self.np.int64), past=self._past)
        self._logits = logits[0, -1].copy()
        return int(self._logits.argmax())

    def describe(self) -> dict:
        return {"name": self.name, "version": versions(["onnxruntime"]).get("onnxruntime"),
                "execution_provider": self.execution_provider, "providers_requested": self.providers_requested,
                "providers_used": self.providers_used, "providers_available": self.providers_available,
                "threads": self.threads or "onnxruntime default"}

    def close(self) -> None:
        self.gen = None


class LlamaBackend:
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int | None, n_gpu_layers: int, n_ctx: int, n_batch: int):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ProfileError("GGUF artifacts need llama-cpp-python: pip install llama-cpp-python numpy psutil "
                               "(built with CUDA on Jetson: CMAKE_ARGS=-DGGML_CUDA=on)") from None
        try:
            generator = _runtime_module("llama_generate").LlamaGenerator
            self.gen = generator(path, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers, n_batch=n_batch)
        except (ValueError, RuntimeError) as e:
            raise ProfileError(f"llama.cpp cannot load {path}: {str(e).strip().splitlines()[0][:200]}") from None
        self.threads = self.gen.llm.context_params.n_threads
        self.threads_batch = self.gen.llm.context_params.n_threads_batch
        self.execution_provider = self.gen.execution_provider
        self.n_gpu_layers = n_gpu_layers
        self.n_ctx, self.n_batch = self.gen.n_ctx, n_batch

    def prefill(self, ids) -> None:
        self.gen.prefill_only(ids)

    def first_token(self) -> int:
        return self.gen._argmax()

    def step(self, token: int) -> int:
        return self.gen.step(token)

    def describe(self) -> dict:
        import llama_cpp

        info = llama_cpp.llama_print_system_info()
        return {"name": self.name, "version": getattr(llama_cpp, "__version__", None),
                "execution_provider": self.execution_provider, "n_gpu_layers": self.n_gpu_layers,
                "gpu_offload_supported": self.gen.gpu_offload, "threads": self.threads,
                "threads_batch": self.threads_batch, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
                "extra_buffer_types": self.gen.extra_buffer_types, "file_type": self.gen.file_type,
                "system_info": info.decode(errors="replace").strip() if isinstance(info, bytes) else str(info)}

    def close(self) -> None:
        self.gen.close()


def _median(xs):
    return statistics.median(xs) if xs else None


def _percentile(xs, q: float):
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(x):
    return None if x is None else round(1000 * x, 3)


def _ids(rng, n: int, vocab: int) -> list[int]:
    low = min(3, max(vocab - 1, 0))  # skip the usual special ids; any id is valid for timing
    return [int(t) for t in rng.integers(low, max(vocab, low + 1), n)]


def measure_prefill(backend, lengths, vocab: int, warmup: int, repeats: int, rng) -> list[dict]:
    rows = []
    for n in lengths:
        ids = _ids(rng, n, vocab)
        for _ in range(warmup):
            backend.prefill(ids)
            backend.first_token()
        pre, ttft = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.prefill(ids)
            t1 = time.perf_counter()
            backend.first_token()
            t2 = time.perf_counter()
            pre.append(t1 - t0)
            ttft.append(t2 - t0)
        p = _median(pre)
        rows.append({"prompt_tokens": n, "prefill_ms": _ms(p), "prefill_tokens_per_s": round(n / p, 2) if p else None,
                     "ttft_ms": _ms(_median(ttft)), "prefill_ms_all": [_ms(x) for x in pre],
                     "ttft_ms_all": [_ms(x) for x in ttft]})
    return rows


def measure_decode(backend, prompt_tokens: int, new_tokens: int, vocab: int, warmup: int, repeats: int,
                   rng) -> dict:
    ids = _ids(rng, prompt_tokens, vocab)

    def run(steps: int) -> list[float]:
        backend.prefill(ids)
        tok = backend.first_token()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = backend.step(tok)
            times.append(time.perf_counter() - t0)
        return times

    for _ in range(warmup):
        run(min(new_tokens, 8))
    per_run, all_steps = [], []
    for _ in range(repeats):
        times = run(new_tokens)
        all_steps += times
        per_run.append(len(times) / sum(times) if sum(times) else None)
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "tokens_per_s": round(_median([x for x in per_run if x]), 2) if any(per_run) else None,
            "tokens_per_s_all": [round(x, 2) if x else None for x in per_run],
            "ms_per_token_p50": _ms(_percentile(all_steps, 0.5)), "ms_per_token_p95": _ms(_percentile(all_steps, 0.95)),
            "ms_per_token_mean": _ms(statistics.fmean(all_steps)) if all_steps else None,
            "steps_measured": len(all_steps)}
