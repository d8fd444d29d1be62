"""The memory check the profiler makes before it loads anything: the resident memory an artifact will need (weights,
KV cache, prefill activations, runtime; calibrated, with a margin) against a budget, and the context it plans
for the requested prompt lengths and decode steps. Needs no model file for ``estimate_memory_for``, so a host
can predict the check for an artifact that does not exist yet (edgeprune fit). Runs on the device: standard
library (psutil for the "auto" budget).

It measures nothing (``machine.py`` reads the resident memory, ``timing.py`` times the runtime).
"""

from __future__ import annotations

from pathlib import Path

if __package__:
    from .artifact_info import ProfileError, artifact_info, model_shape
    from .machine import MiB
else:  # alone in a bundle, beside its sibling modules
    from artifact_info import ProfileError, artifact_info, model_shape
    from machine import MiB

DEFAULT_DECODE_PROMPT = 128
# Memory model (see estimate_memory_for), calibrated on this repository's x86-64 CPU host with SmolLM2-135M dense
# and pruned (bench/fit_memory.py; README "fit"): the fixed cost of Python + numpy + psutil + the runtime; how
# many bytes of resident memory one byte of the model file costs (llama.cpp maps the file; onnxruntime holds
# the parsed model and its initializers, 1.27x the file); and onnxruntime's prepacked copy of MatMulNBits
# weights (every MatMul's, not the embedding's Gather), per byte of those weights, by dtype.
RUNTIME_OVERHEAD_MIB = {"onnx": 60.0, "gguf": 70.0}
WEIGHT_FACTOR = {"onnx": 1.27, "gguf": 1.0}
PREPACK_FACTOR = {"int8": 0.9}
ONNX_EMBEDDING_BYTES = {"int8": 1.125, "fp16": 2.0, "fp32": 4.0}  # per embedding weight (GatherBlockQuantized)
LOGITS_COPIES = {"onnx": 1.35, "gguf": 2.0}  # logits buffers held at once during prefill (runtime arena + numpy)
MARGIN = 1.10


def estimate_memory(path: Path, n_ctx: int, max_prompt: int, info: dict | None = None) -> dict:
    """Resident memory the profiler will need for the artifact at ``path`` (see ``estimate_memory_for``)."""
    info = info or artifact_info(path)
    return estimate_memory_for(info["format"], info["model_bytes"], model_shape(path), n_ctx, max_prompt,
                               info.get("dtype"))


def estimate_memory_for(fmt: str, model_bytes: float, shape: dict, n_ctx: int, max_prompt: int,
                        dtype: str | None = None) -> dict:
    """Resident memory, in MiB, of an artifact described by its format, its model file's size in bytes, its
    shape (``model_shape``'s keys) and dtype, by part: ``expected_mb`` is the predicted peak RSS, ``estimate_mb``
    (what the budget check compares) adds a 10 % margin. The parts: the weights (x WEIGHT_FACTOR, plus
    onnxruntime's prepacked MatMulNBits copy), the KV cache at ``n_ctx`` tokens (f16 in llama.cpp, which pads
    every layer's V cache to the widest layer's when they differ; f32 in onnxruntime), prefill activations
    (onnxruntime returns logits for every prompt position) and the runtime. Needs no file, so a host can predict
    an artifact's check before the artifact exists (edgeprune fit)."""
    kv = [int(k) for k in shape.get("kv_heads") or []]
    head_dim = int(shape.get("head_dim") or 0)
    vocab, hidden, heads = (int(shape.get(k) or 0) for k in ("vocab", "hidden", "heads"))
    if fmt == "gguf":
        v_heads = max(kv, default=0) * sum(1 for k in kv if k) if len(set(k for k in kv if k)) > 1 else sum(kv)
        kv_bytes = (sum(kv) + v_heads) * head_dim * n_ctx * 2
    else:
        kv_bytes = 2 * sum(kv) * head_dim * n_ctx * 4
    rows = max_prompt if fmt == "onnx" else 1  # logits rows the runtime materialises
    act_bytes = rows * vocab * 4 * LOGITS_COPIES[fmt] + max_prompt * (hidden * 4 * 8 + heads * max_prompt * 4)
    if fmt == "onnx" and shape.get("shared_head"):
        # a tied head that shares the embedding's table in the file (export/onnx_weights.py, onnx_quant.py) makes
        # the file smaller, not the session: onnxruntime folds the float graph's Transpose into a second table
        # when it creates the session, and for int8 keeps the shared table for the Gather and prepacks a copy for
        # the MatMul, as it did with two. Measured on SmolLM2-135M: fp32 the same RSS after load, int8 within
        # 15 MiB. So the resident weights are those of the two-table file.
        model_bytes = model_bytes + vocab * hidden * ONNX_EMBEDDING_BYTES.get(dtype or "fp32", 4.0)
    weights = model_bytes * WEIGHT_FACTOR[fmt]
    if fmt == "onnx" and dtype in PREPACK_FACTOR:
        matmul_bytes = max(model_bytes - vocab * hidden * ONNX_EMBEDDING_BYTES[dtype], 0)
        weights += matmul_bytes * PREPACK_FACTOR[dtype]
    parts = {"weights": weights / MiB, "kv_cache": kv_bytes / MiB, "activations": act_bytes / MiB,
             "runtime": RUNTIME_OVERHEAD_MIB[fmt]}
    expected = sum(parts.values())
    return {"estimate_mb": round(expected * MARGIN, 1), "expected_mb": round(expected, 1),
            "parts_mb": {k: round(v, 1) for k, v in parts.items()}, "margin": MARGIN, "n_ctx": n_ctx,
            "max_prompt_tokens": max_prompt}


def resolve_budget(budget) -> float | None:
    """A budget in MiB from a number, "auto" (80 % of this machine's RAM) or None (no check)."""
    if budget is None or budget == "":
        return None
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        import psutil

        return 0.8 * psutil.virtual_memory().total / MiB
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ProfileError(f"memory budget must be a number of MiB or 'auto', not {budget!r}") from None
    if value <= 0:
        raise ProfileError("memory budget must be positive")
    return value


def check_memory(estimate: dict, budget_mb: float | None, device: str | None = None) -> dict:
    result = {**estimate, "budget_mb": None if budget_mb is None else round(budget_mb, 1)}
    if budget_mb is None:
        result["fits"] = None
        return result
    result["fits"] = estimate["estimate_mb"] <= budget_mb
    if not result["fits"]:
        p = estimate["parts_mb"]
        where = f"device '{device}'" if device else "this device"
        raise ProfileError(
            f"artifact does not fit: it needs about {estimate['estimate_mb']:.0f} MiB (weights {p['weights']:.0f} + "
            f"KV cache {p['kv_cache']:.0f} + activations {p['activations']:.0f} + runtime {p['runtime']:.0f}, "
            f"+{100 * (MARGIN - 1):.0f}%) but {where} has a memory budget of {budget_mb:.0f} MiB; use a smaller "
            f"dtype or a more pruned model, fewer tokens (--prompt-lengths/--new-tokens), or raise the budget "
            f"(memory_budget_mb in the device profile, --memory-budget)")
    return result


def plan_context(prompt_lengths, new_tokens: int, decode_prompt: int | None, limit: int | None):
    """(prompt lengths that fit the model's context, the ones that do not, decode prompt length, n_ctx)."""
    lengths = sorted({int(n) for n in prompt_lengths})
    if not lengths or lengths[0] < 1:
        raise ProfileError("prompt lengths must be positive integers")
    skipped = []
    if limit:
        skipped = [n for n in lengths if n > limit]
        lengths = [n for n in lengths if n <= limit]
        if not lengths:
            raise ProfileError(f"every prompt length exceeds the model's context of {limit} tokens")
    decode_prompt = int(decode_prompt or min(DEFAULT_DECODE_PROMPT, lengths[-1]))
    if limit and decode_prompt + new_tokens > limit:
        decode_prompt = max(1, limit - new_tokens)
        if decode_prompt + new_tokens > limit:
            raise ProfileError(f"--new-tokens {new_tokens} does not fit the model's context of {limit} tokens")
    n_ctx = max(lengths[-1], decode_prompt + new_tokens)
    n_ctx = -(-n_ctx // 256) * 256
    if limit:
        n_ctx = min(n_ctx, limit)
    return lengths, skipped, decode_prompt, n_ctx


def memory_check_for(artifact, prompt_lengths, new_tokens: int, decode_prompt: int | None, budget,
                     device: str | None = None) -> dict:
    """The check ``profile`` does before loading anything (raises ProfileError when the artifact does not fit)."""
    path = Path(artifact)
    shape = model_shape(path)
    limit = int(shape["context"]) if shape.get("context") else None
    lengths, _, _, n_ctx = plan_context(prompt_lengths, new_tokens, decode_prompt, limit)
    return check_memory(estimate_memory(path, n_ctx, lengths[-1]), resolve_budget(budget), device)
