"""Greedy generation with llama.cpp (llama-cpp-python) for devices: imports only numpy, llama_cpp and the standard
library (no torch, no transformers, no gguf package). The llama.cpp counterpart of ``ort_generate``.

``gguf_metadata`` reads a GGUF file's key/value header with the standard library (no tensors), so the memory
check can size a model before llama.cpp loads it.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

# GGUF value types (gguf spec): struct format, or None for string / array
_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
UNQUANTIZED_FILE_TYPES = (0, 1)  # llama_ftype ALL_F32, MOSTLY_F16


def gguf_metadata(path, max_array: int = 4096) -> dict:
    """The key/value metadata of a GGUF file (v2/v3). Arrays longer than ``max_array`` (the tokenizer's
    vocabulary) are replaced by their length, as ``{"array_len": n}``."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = struct.unpack("<I", f.read(4))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        _n_tensors, n_kv = struct.unpack("<QQ", f.read(16))

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind in _GGUF_SCALAR:
                fmt = _GGUF_SCALAR[kind]
                return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                (sub,) = struct.unpack("<I", f.read(4))
                (n,) = struct.unpack("<Q", f.read(8))
                if n > max_array:
                    if sub in _GGUF_SCALAR:
                        f.seek(n * struct.calcsize(_GGUF_SCALAR[sub]), os.SEEK_CUR)
                    else:
                        for _ in range(n):
                            value(sub)
                    return {"array_len": n}
                return [value(sub) for _ in range(n)]
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        meta = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack("<I", f.read(4))
            meta[key] = value(kind)
        return meta


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


@contextlib.contextmanager
def no_extra_buffer_types(llama_cpp):
    """Load with ``use_extra_bufts = False`` (llama-cpp-python does not expose the flag). The llama.cpp bundled
    with llama-cpp-python 0.3.36 segfaults in llama_decode on quantized GGUFs with the CPU's extra buffer types
    (AMX / repacked weights) on AMX CPUs; see export/gguf.py."""
    low = llama_cpp.llama_cpp
    orig = low.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = orig


class LlamaGenerator:
    """Prefill, single-token decode steps and greedy generation with a GGUF model.

    ``model_dir_or_gguf``: an artifact directory with ``model.gguf`` or the file itself. ``threads``: llama.cpp
    threads for prefill and decode (default: llama.cpp's choice). ``n_gpu_layers``: layers offloaded to the GPU
    of a CUDA/Metal build (-1: all). ``extra_buffer_types``: True, False or "auto" (off for quantized files on
    CPUs with AMX, where the bundled llama.cpp crashes with them).
    """

    def __init__(self, model_dir_or_gguf, n_ctx: int = 2048, threads: int | None = None, n_gpu_layers: int = 0,
                 n_batch: int = 512, extra_buffer_types="auto"):
        import llama_cpp

        path = Path(model_dir_or_gguf)
        if path.is_dir():
            path = path / "model.gguf"
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF model at {model_dir_or_gguf}")
        self.path = path
        self.meta = gguf_metadata(path)
        self.file_type = int(self.meta.get("general.file_type", 0))
        quantized = self.file_type not in UNQUANTIZED_FILE_TYPES
        if extra_buffer_types == "auto":
            extra_buffer_types = not (quantized and _cpu_has_amx())
        self.extra_buffer_types = bool(extra_buffer_types)
        self.n_gpu_layers = int(n_gpu_layers)
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        n_batch = max(1, min(int(n_batch), int(n_ctx)))
        guard = contextlib.nullcontext() if self.extra_buffer_types else no_extra_buffer_types(llama_cpp)
        with guard:
            self.llm = llama_cpp.Llama(str(path), n_ctx=int(n_ctx), n_batch=n_batch, n_ubatch=n_batch,
                                       n_threads=threads, n_threads_batch=threads, n_gpu_layers=self.n_gpu_layers,
                                       logits_all=False, seed=0, verbose=False)
        self._llama_cpp = llama_cpp
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        self.eos_token_ids = {int(self.llm.token_eos())}

    @property
    def execution_provider(self) -> str:
        if self.n_gpu_layers and self.gpu_offload:
            return "llama.cpp GPU"
        return "llama.cpp CPU"

    def logits(self):
        """The logits of the last evaluated position (a numpy view of llama.cpp's buffer: copy to keep)."""
        import numpy as np

        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _argmax(self) -> int:
        return int(self.logits().argmax())

    def prefill(self, ids: Sequence[int]) -> int:
        """Evaluate a prompt from an empty cache; returns the greedy next token."""
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return self._argmax()

    def prefill_only(self, ids: Sequence[int]) -> None:
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])

    def step(self, token: int) -> int:
        """Append one token to the cache; returns the greedy next token."""
        self.llm.eval([int(token)])
        return self._argmax()

    def encode(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def generate(self, prompt, max_new_tokens: int = 32, stop_at_eos: bool = True) -> tuple[list[int], dict]:
        """Greedy tokens after ``prompt`` (text or ids) and their timing: ttft_s and token_s (decode steps)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        out: list[int] = []
        t0 = time.perf_counter()
        nxt = self.prefill(ids)
        timing = {"prompt_tokens": len(ids), "ttft_s": time.perf_counter() - t0, "token_s": []}
        out.append(nxt)
        while len(out) < max_new_tokens and not (stop_at_eos and nxt in self.eos_token_ids):
            t0 = time.perf_counter()
            nxt = self.step(nxt)
            timing["token_s"].append(time.perf_counter() - t0)
            out.append(nxt)
        return out, timing

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()
