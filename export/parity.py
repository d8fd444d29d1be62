"""The parity record both exporters write: how closely an exported model reproduces PyTorch (fp32).

``ParityRecord`` is the one shape of a parity check's result, for ONNX (``export/onnx.py``) and GGUF
(``export/gguf/check.py``); the manifest's ``parity`` field is its ``to_dict()``, which the CLI, the run report
and bench/export_report.py read (``passed``, ``max_abs_logit_diff``, ``tolerance``, ``mean_kl``,
``top1_agreement``, ``greedy_match``). Runtime-specific measurements (the cache checks of ONNX, the tokenizer
and decode speed of llama.cpp, the greedy tokens) go in ``details`` and are flattened into the dict.

It computes the distribution measures (log-softmax, KL) with numpy; it does not run any model or decide the
tolerances (each exporter owns its per-dtype tolerances).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class ParityRecord:
    runtime: str  # "onnxruntime" or "llama.cpp"
    dtype: str
    passed: bool
    max_abs_logit_diff: float  # over every compared position and vocabulary entry
    tolerance: float  # the bound on max_abs_logit_diff for this dtype
    mean_kl: float  # mean KL(PyTorch || runtime) of the next-token distributions, nats
    kl_tolerance: float | None  # bound on mean_kl (None: not judged on it)
    top1_agreement: float  # fraction of positions with the same argmax
    min_top1_agreement: float | None  # bound on top1_agreement (None: not judged on it)
    greedy_match: bool  # greedy decoding gives PyTorch's tokens
    greedy_agreement: float  # fraction of greedy tokens before the first divergence
    greedy_required: bool  # whether passing needs greedy_match
    positions: int
    prompts: int
    n_tokens: int  # greedy tokens generated per checked prompt
    tokenizer_match: bool | None = None  # the runtime's own tokenizer gives the HF token ids (GGUF)
    cache_match: bool | None = None  # greedy with the KV cache equals greedy without it (ONNX)
    cache_max_abs_logit_diff: float | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("details")
        return {**d, **extra}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_per_position(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per position (rows), in nats."""
    lp, lq = log_softmax(ref), log_softmax(got)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def first_divergence(reference: list[int], got: list[int]) -> int | None:
    """Index of the first differing token, None when the sequences agree over their common length."""
    return next((i for i, (a, b) in enumerate(zip(reference, got, strict=False)) if a != b), None)


def describe(p: dict) -> str:
    """One line for an error message: what failed against which bound."""
    parts = [f"max |logit diff| {p.get('max_abs_logit_diff', float('nan')):.4g} "
             f"(tolerance {p.get('tolerance')})"]
    if p.get("mean_kl") is not None:
        parts.append(f"mean KL {p['mean_kl']:.4g} (tolerance {p.get('kl_tolerance')})")
    if p.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {p['top1_agreement']:.3f}")
    parts.append(f"greedy match {p.get('greedy_match')}")
    if p.get("cache_match") is not None:
        parts.append(f"cache diff {p.get('cache_max_abs_logit_diff', float('nan')):.3g}, "
                     f"cache match {p['cache_match']}")
    if p.get("tokenizer_match") is not None:
        parts.append(f"tokenizer match {p['tokenizer_match']}")
    return ", ".join(parts)
