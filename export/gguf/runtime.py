"""llama.cpp on the host: the one context policy, logits, and perplexity in llama.cpp.

``llama_context`` is the only place the exporter's checks and PPL build a ``llama_cpp.Llama``: same token ids as
PyTorch, an f32 KV cache (so a comparison measures the weights' format only), one batch for the whole context,
and the CPU's extra buffer types (AMX / repacked weights) off for quantized files, with which the bundled
llama.cpp segfaulted in llama_decode on every quantized GGUF tried here (ours, llama.cpp's own Q8_0, the default
Q4_1 file; an AVX-512 CPU without AMX). The device side (``devices/llama_generate.py``) cannot import this module
and keeps its own copy of the switch.

``gguf_perplexity`` is llama.cpp's PPL with edgeprune's protocol (``edgeprune.evaluate.ppl`` is PyTorch's,
``OrtGenerator.perplexity`` onnxruntime's). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import gguf
import numpy as np
from edgeprune.devices.llama_generate import no_extra_buffer_types
from edgeprune.export.gguf.reader import gguf_dtype, metadata

from edgeprune.errors import EdgePruneError, first_line


def llama_context(gguf_path, n_ctx: int, *, all_logits: bool = True, n_threads: int | None = None,
                  n_batch: int | None = None):
    """A llama.cpp context for ``gguf_path``. ``all_logits``: keep every position's logits (parity, PPL); off
    for generation, which reads only the last position. ``n_batch``: tokens per llama_decode (default n_ctx)."""
    try:
        import llama_cpp
    except ImportError:
        raise EdgePruneError("GGUF checks need llama-cpp-python: pip install 'edgeprune[gguf-runtime]'") from None
    path = Path(gguf_path)
    if not path.is_file():
        raise EdgePruneError(f"GGUF file not found: {path}")
    quantized = gguf_dtype(path) not in ("f32", "f16")
    batch = max(1, min(int(n_batch or n_ctx), int(n_ctx)))
    try:
        with no_extra_buffer_types(llama_cpp) if quantized else contextlib.nullcontext():
            return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=batch, n_ubatch=batch, logits_all=all_logits,
                                   n_threads=n_threads, n_threads_batch=n_threads, type_k=0, type_v=0, seed=0,
                                   verbose=False)
    except Exception as e:  # llama.cpp reports a failed load as ValueError/RuntimeError
        raise EdgePruneError(f"llama.cpp cannot load {path}: {first_line(e)}") from None


def logits(llm, ids: list[int]) -> np.ndarray:
    """Every position's logits for ``ids`` evaluated from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def window_nll(window_logits: np.ndarray, targets) -> float:
    """Summed negative log-likelihood of ``targets`` under rows of logits (float64)."""
    x = window_logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    target = np.asarray(targets)
    return float((logz - x[np.arange(len(target)), target]).sum())


def _bos_prefix(gguf_path) -> int | None:
    """The BOS id when the file says to add one (Gemma), else None: windows then start with it, unscored, as in
    ``edgeprune.evaluate.ppl``."""
    meta = metadata(gguf_path, (gguf.Keys.Tokenizer.ADD_BOS, gguf.Keys.Tokenizer.BOS_ID))
    bos = meta.get(gguf.Keys.Tokenizer.BOS_ID)
    return int(bos) if meta.get(gguf.Keys.Tokenizer.ADD_BOS) and bos is not None else None


def gguf_perplexity(gguf_path, text, seq_len: int = 128, max_tokens: int | None = None, *,
                    token_ids: list[int] | None = None, n_threads: int | None = None) -> dict:
    """Perplexity in llama.cpp with edgeprune's protocol (``edgeprune.evaluate.ppl``): the text tokenized once
    (llama.cpp's tokenizer, no BOS; or the given ``token_ids``), cut into non-overlapping ``seq_len`` windows,
    each scored independently (after an unscored BOS when the file adds one), PPL = exp(mean NLL over all predicted
    tokens)."""
    if seq_len < 2:
        raise EdgePruneError("seq_len must be at least 2")
    raw = getattr(text, "text", text)
    name = getattr(text, "name", "text")
    bos = _bos_prefix(gguf_path)
    prefix = [] if bos is None else [bos]
    llm = llama_context(gguf_path, seq_len + len(prefix), n_threads=n_threads)
    try:
        ids = list(token_ids) if token_ids is not None else llm.tokenize(raw.encode("utf-8"), add_bos=False,
                                                                         special=False)
        total = len(ids)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        n_windows = len(ids) // seq_len
        if n_windows == 0:
            raise EdgePruneError(f"text has {len(ids)} tokens, fewer than one window of seq_len {seq_len}")
        nll = 0.0
        start = time.perf_counter()
        for w in range(n_windows):
            win = ids[w * seq_len: (w + 1) * seq_len]
            nll += window_nll(logits(llm, prefix + win)[len(prefix):-1], win[1:])
        seconds = time.perf_counter() - start
    finally:
        llm.close()
    mean = nll / (n_windows * (seq_len - 1))
    return {"ppl": math.exp(mean), "nll": mean, "seq_len": seq_len, "windows": n_windows,
            "tokens_scored": n_windows * seq_len, "tokens_in_text": total, "max_tokens": max_tokens,
            "text": name, "tokenizer": "given ids" if token_ids is not None else "llama.cpp", "seconds": seconds,
            "prompt_tokens_per_s": n_windows * seq_len / seconds if seconds > 0 else None}
