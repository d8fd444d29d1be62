"""The ONNX parity check: an exported graph in onnxruntime against the PyTorch checkpoint it came from (logits,
greedy tokens, KV-cache consistency, KL of the next-token distributions), with per-dtype tolerances, and the
dtype of an exported graph read from its operators.

It does not export or quantize (``onnx.py``, ``onnx_quant.py``); the result's shape is ``parity.ParityRecord``.
onnxruntime and PyTorch are never resident together: onnxruntime's side runs first.
"""

from __future__ import annotations

import gc
from pathlib import Path

from edgeprune.export.onnx_files import MODEL_FILE
from edgeprune.export.parity import ParityRecord, first_divergence, kl_per_position

from edgeprune.errors import EdgePruneError

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The history of the region begins in the early Middle Ages, when small farming communities settled along the "
    "river. Over the following centuries the towns grew into trading centres, and by the seventeenth century",
)
# Parity tolerances against PyTorch (float32), per exported dtype.
# Max abs logit difference, measured on SmolLM2-135M (logits up to ~35): fp32 8e-5, fp16 0.04, int8 nbits8 1.8,
# on a pruned SmolLM2 3.8 (a max over 49152 logits at every position is a harsh measure for a quantized model);
# per-tensor dynamic int8 19-23. fp32 leaves room for float32 noise: on a pruned SmolLM2 with residual
# activations ~1e4 PyTorch's own float32 logits differ from float64 by 1.5e-3 (ONNX vs PyTorch: 1.9e-3).
# Real export bugs (mask, positions, cache) give differences of order 1 and also break the greedy/cache checks.
TOLERANCE = {"fp32": 1e-2, "fp16": 0.5, "int8": 8.0}
# Mean KL(PyTorch || ONNX) of the next-token distributions, in nats (fp16/int8 only; close to the NLL, hence
# log-PPL, increase it allows: 0.05 nats ~ 5%). Measured: fp16 1e-5; int8 nbits8 0.007 (dense) / 0.010
# (pruned), nbits8-b64 0.009 / 0.017, smooth-hybrid 0.012 / 0.074; per-tensor dynamic int8 0.66-0.75.
KL_TOLERANCE = {"fp32": None, "fp16": 0.01, "int8": 0.05}


def check_onnx(onnx_dir, checkpoint_dir, prompts=None, n_tokens: int = 16) -> dict:
    """Compare an exported model with the PyTorch checkpoint it came from.

    - ``max_abs_logit_diff``: onnxruntime vs PyTorch logits over every position of each prompt followed by its
      generated tokens, and over a left-padded batch of two prompts (checks attention_mask/position_ids);
    - ``greedy_match``: onnxruntime's greedy tokens (with the KV cache) equal PyTorch's greedy tokens;
    - ``cache_match``: greedy with the cache equals greedy without it (full recomputation) in onnxruntime;
      ``cache_max_abs_logit_diff`` compares the logits of every cached step with the recomputed ones;
    - ``mean_kl``: mean KL divergence (nats) of onnxruntime's next-token distributions from PyTorch's;
    - ``passed``: fp32 needs all of them (logits within ``tolerance``); fp16/int8 need the logits and the cache
      logits within the dtype's ``tolerance`` and ``mean_kl`` within ``kl_tolerance`` (token agreement with
      PyTorch is reported as ``greedy_agreement``, the fraction of tokens before the first divergence, since a
      quantized model may rightly pick another token at a near tie).
    """
    from edgeprune.models import load

    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / MODEL_FILE).is_file():
        raise EdgePruneError(f"{onnx_dir} has no {MODEL_FILE}")
    src = Path(checkpoint_dir)
    if not (src / "config.json").is_file():
        raise EdgePruneError(f"{checkpoint_dir} is not a model directory (no config.json)")
    lm = load(str(src))
    return check_parity(onnx_dir, encode_prompts(lm.tokenizer, prompts), lambda: lm.model, n_tokens,
                        onnx_dtype(onnx_dir))


def encode_prompts(tokenizer, prompts=None) -> list[list[int]]:
    """The parity check's prompts (``DEFAULT_PROMPTS`` unless given) as token ids, special tokens included."""
    return [list(tokenizer(p, add_special_tokens=True)["input_ids"]) or [0] for p in (prompts or DEFAULT_PROMPTS)]


def onnx_dtype(onnx_dir) -> str:
    """fp32 / fp16 / int8, from the graph's operators and initializers (external data not read)."""
    import onnx

    path = Path(onnx_dir)
    proto = onnx.load(str(path / MODEL_FILE if path.is_dir() else path), load_external_data=False)
    if {n.op_type for n in proto.graph.node} & {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
                                                 "DynamicQuantizeLinear", "GatherBlockQuantized"}:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


def _ort_outputs(onnx_dir: Path, encoded: list, n_tokens: int) -> tuple[list, object]:
    """onnxruntime's side of the check, run before the PyTorch model is loaded (the two are never resident
    together): per prompt (greedy tokens with the cache, the cached steps' logits, the full forward's logits on
    prompt + generated tokens), and the left-padded batch's logits."""
    import numpy as np
    from edgeprune.devices.ort_generate import OrtGenerator

    gen = OrtGenerator(onnx_dir)
    runs = []
    for ids in encoded:
        new = gen.generate(ids, max_new_tokens=n_tokens, greedy=True, use_cache=True, stop_at_eos=False,
                           keep_logits=True)
        steps = gen.last_logits
        # one full forward each (no cache) on prompt + generated tokens: greedy decoding would reproduce `new`
        # exactly when the argmax at every generated position is the token that was generated there
        full = gen.prefill(np.array([ids + new[:-1]], dtype=np.int64))[0]
        runs.append((new, steps, full))
    padded = None
    if len(encoded) > 1:  # a left-padded batch
        width = max(len(e) for e in encoded[:2])
        ids = np.zeros((2, width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, e in enumerate(encoded[:2]):
            ids[r, width - len(e):], mask[r, width - len(e):] = e, 1
        padded = gen.prefill(ids, attention_mask=mask)
    return runs, padded


def check_parity(onnx_dir: Path, encoded: list[list[int]], reference, n_tokens: int, dtype: str) -> dict:
    """``check_onnx``'s comparison, for prompts already encoded (``encode_prompts``). ``reference``: a callable
    returning the PyTorch model, called once onnxruntime's session is gone."""
    import numpy as np
    import torch

    n_tokens = max(int(n_tokens), 1)
    tolerance = TOLERANCE[dtype]
    runs, padded = _ort_outputs(onnx_dir, encoded, n_tokens)
    gc.collect()
    model = reference()
    max_diff = cache_diff = kl_sum = 0.0
    greedy_ok = cache_ok = True
    agree = top1 = positions = 0
    for r, (ids, (new, steps, full)) in enumerate(zip(encoded, runs, strict=True)):
        seq = ids + new[:-1]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float().numpy()
        p = len(ids)
        at = slice(p - 1, p - 1 + len(new))
        max_diff = max(max_diff, float(np.abs(full - ref).max()))
        cache_diff = max(cache_diff, float(np.abs(steps - full[at]).max()))
        cache_ok &= full[at].argmax(-1).tolist() == new
        torch_tokens = ref[at].argmax(-1).tolist()
        greedy_ok &= torch_tokens == new
        mismatch = first_divergence(torch_tokens, new)
        agree += len(new) if mismatch is None else mismatch
        top1 += int((full.argmax(-1) == ref.argmax(-1)).sum())
        kl_sum += float(kl_per_position(ref, full).sum())
        positions += len(seq)
        if padded is not None and r < 2:
            width = padded.shape[1]
            max_diff = max(max_diff, float(np.abs(padded[r, width - p:] - ref[:p]).max()))
    strict = dtype == "fp32"
    mean_kl = kl_sum / max(positions, 1)
    if not strict:
        cache_ok = cache_ok or cache_diff <= tolerance
    passed = (max_diff <= tolerance and cache_diff <= tolerance and cache_ok and (greedy_ok or not strict)
              and (KL_TOLERANCE[dtype] is None or mean_kl <= KL_TOLERANCE[dtype]))
    return ParityRecord(
        runtime="onnxruntime", dtype=dtype, passed=bool(passed), max_abs_logit_diff=max_diff, tolerance=tolerance,
        mean_kl=mean_kl, kl_tolerance=KL_TOLERANCE[dtype], top1_agreement=top1 / max(positions, 1),
        min_top1_agreement=None, greedy_match=bool(greedy_ok), greedy_agreement=agree / (len(encoded) * n_tokens),
        greedy_required=strict, positions=positions, prompts=len(encoded), n_tokens=n_tokens,
        cache_match=bool(cache_ok), cache_max_abs_logit_diff=cache_diff).to_dict()
