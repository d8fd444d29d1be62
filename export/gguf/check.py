"""The GGUF parity check: llama.cpp on the exported file against PyTorch (fp32) on the checkpoint, same token ids.

The PyTorch reference computes in float32 without holding a float32 copy of a 16-bit checkpoint: such a
checkpoint is loaded in its own dtype and each top-level module (embeddings, every decoder layer, final norm,
lm_head) is cast to float32 just before its forward and back right after (``float32_compute``), so at most one
module's float32 copy exists at a time (a 3B bf16 checkpoint: 6 GiB of weights plus one 0.4 GiB layer, or the
1.5 GiB float32 embedding, instead of 12 GiB). Upcasting a 16-bit weight is exact, so the reference's logits
are those of the checkpoint loaded in float32 (up to float rounding) and the tolerances below keep their meaning;
computing the reference in bf16 instead would add bf16 rounding to every comparison (logit errors far above the
f32 tolerance). It does not stream layers from disk: the checkpoint must fit in memory in its own dtype.

Returns the shared ``ParityRecord`` (``export/parity.py``) as a dict. Needs torch, transformers and
llama-cpp-python; the context comes from ``runtime.llama_context`` (f32 KV cache, all logits kept).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from edgeprune.export.gguf.reader import gguf_dtype
from edgeprune.export.gguf.runtime import llama_context, logits
from edgeprune.export.parity import ParityRecord, first_divergence, kl_per_position

from edgeprune.errors import EdgePruneError

# Parity tolerances on max |logit difference| vs. PyTorch fp32 over every prompt position and vocabulary entry
# (same token ids, f32 KV cache in llama.cpp), and on top-1 agreement. Measured on SmolLM2-135M (logits up to
# ~30): f32 5e-5 (dense) / 3e-4 (deci), f16 0.035, q8_0 1.26 (top-1 0.97), q4_k_m 7.2 (top-1 0.86; 180 of 272
# tensors fall back to q5_0/q8_0 because 576 is not a multiple of 256); tiny random models: f32 1e-6,
# f16 2e-3, q8_0 0.045, q4_k_m 0.19.
TOLERANCE = {"f32": 1e-2, "f16": 0.15, "q8_0": 8.0, "q4_k_m": 25.0}
# 4-bit files are judged on the mean KL(PyTorch || llama.cpp) over the prompts' positions: their max |logit diff|
# is one position's outlier (a pruned SmolLM2 at 30% gave 12.5 at a single position, KL 0.48 there and <= 0.07
# everywhere else, with top-1 agreement 1.0 and PPL +2.5%); the max bound above is only a gross sanity check.
# Measured mean KL of Q4_K_M on the check prompts: dense SmolLM2 0.12 (PPL +7%), that pruned model 0.05.
MAX_MEAN_KL = {"q4_k_m": 0.25, "q8_0": 0.05}
# q8_0 is judged on the mean KL too (its max bound above is a gross check): pruned SmolLM2 without distillation
# (20-50 %, least-squares refit) gave max |logit diff| 2.4-4.5 at single positions with mean KL 0.008-0.012 and
# top-1 agreement 0.90-1.0 (edgeprune fit's benchmark); the dense model: 1.26, KL well under 0.01.
# Quantized files must also agree on the top-1 token this often; f32/f16 must instead give the same greedy tokens
# (within the logit tolerance every top-1 flip is a near-tie: the reference's gap is at most 2x the tolerance).
MIN_TOP1 = {"q8_0": 0.85, "q4_k_m": 0.75}

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):\n    ",
    "Water boils at a temperature of",
)


def check_gguf(gguf_path, checkpoint_dir, prompts: list[str] | None = None, n_tokens: int = 16, *,
               lm=None, n_threads: int | None = None) -> dict:
    """Compare the GGUF in llama.cpp with the checkpoint in PyTorch (fp32) on the same token ids.

    Reports the max |logit difference|, mean KL and top-1 agreement over all prompt positions, whether greedy
    decoding of ``n_tokens`` gives the same tokens, whether llama.cpp's tokenizer gives the HF token ids, and
    llama.cpp's decode speed. ``passed``: max |diff| within ``TOLERANCE[dtype]``, and for f32/f16 the same
    greedy tokens (a divergence at a near-tie, PyTorch's top-2 gap within 2x the tolerance, is allowed), for
    quantized files top-1 agreement of at least ``MIN_TOP1[dtype]`` (and mean KL within ``MAX_MEAN_KL``).
    ``lm``: the checkpoint already loaded (``edgeprune.models.load``), to save loading it again. A 16-bit
    checkpoint is loaded in its own dtype and run in float32 module by module (see the module docstring).
    ``decode_tokens_per_s`` is the wall clock of the greedy loop (one llama_decode per token, all logits
    kept): a rough figure, not a benchmark.
    """
    from edgeprune.models import load

    if not Path(gguf_path).is_file():
        raise EdgePruneError(f"GGUF file not found: {gguf_path}")
    prompts = list(prompts or DEFAULT_PROMPTS)
    dtype = gguf_dtype(gguf_path)
    lm = lm if lm is not None else load(str(checkpoint_dir), dtype=stored_dtype(checkpoint_dir))
    tok, model = lm.tokenizer, lm.model
    with float32_compute(model):
        return _check(gguf_path, prompts, n_tokens, n_threads, dtype, tok, model)


def _check(gguf_path, prompts, n_tokens, n_threads, dtype, tok, model) -> dict:
    import torch

    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if any(not x for x in ids):
        raise EdgePruneError("every check prompt must give at least one token")
    # PyTorch first: llama.cpp's worker threads keep spinning while a context is alive and slowed torch ~8x
    with torch.inference_mode():
        refs = [model(input_ids=torch.tensor([x]), use_cache=False).logits[0].float().numpy() for x in ids]
    ref_tokens, margins = _torch_greedy(model, ids[0], n_tokens)  # greedy decoding from the first prompt
    add_bos = _adds_bos(tok)
    llm = llama_context(gguf_path, max(len(x) for x in ids) + n_tokens + 8, n_threads=n_threads)
    try:
        max_diff, agree, total, kl_sum = 0.0, 0, 0, 0.0
        for x, ref in zip(ids, refs, strict=True):
            got = logits(llm, x)
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            kl_sum += float(kl_per_position(ref, got).sum())
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(x)
        got_tokens, decode_s = _llama_greedy(llm, ids[0], n_tokens)
        tokenizer_match = all(llm.tokenize(p.encode("utf-8"), add_bos=add_bos, special=False) == x
                              for p, x in zip(prompts, ids, strict=True))
        got_text = llm.detokenize(got_tokens).decode("utf-8", errors="replace")
    finally:
        llm.close()
    mismatch = first_divergence(ref_tokens, got_tokens)
    tol = TOLERANCE.get(dtype, TOLERANCE["q4_k_m"])
    exact = dtype in ("f32", "f16")
    near_tie = mismatch is not None and margins[mismatch] <= 2 * tol
    top1, mean_kl = agree / total, kl_sum / total
    min_top1 = None if exact else MIN_TOP1.get(dtype, 0.5)
    passed = (max_diff <= tol and (mismatch is None or near_tie or not exact)
              and mean_kl <= MAX_MEAN_KL.get(dtype, float("inf")) and (min_top1 is None or top1 >= min_top1))
    return ParityRecord(
        runtime="llama.cpp", dtype=dtype, passed=bool(passed), max_abs_logit_diff=max_diff, tolerance=tol,
        mean_kl=mean_kl, kl_tolerance=MAX_MEAN_KL.get(dtype), top1_agreement=top1, min_top1_agreement=min_top1,
        greedy_match=mismatch is None, greedy_agreement=(n_tokens if mismatch is None else mismatch) / n_tokens,
        greedy_required=exact, positions=total, prompts=len(prompts), n_tokens=n_tokens,
        tokenizer_match=tokenizer_match,
        details={"greedy_first_mismatch": mismatch, "greedy_mismatch_is_near_tie": near_tie,
                 "greedy_tokens": got_tokens, "reference_tokens": ref_tokens, "greedy_text": got_text,
                 "reference_text": tok.decode(ref_tokens), "kv_cache": "f32",
                 "decode_tokens_per_s": n_tokens / decode_s if decode_s > 0 else None}).to_dict()


def stored_dtype(checkpoint_dir) -> str:
    """The dtype a checkpoint stores its weights in (its config's ``dtype``/``torch_dtype``): ``bfloat16`` or
    ``float16``, else ``float32``."""
    from edgeprune.models.loader import read_config

    cfg = read_config(Path(checkpoint_dir))
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in ("bfloat16", "float16") else "float32"


@contextmanager
def float32_compute(model):
    """Run ``model`` in float32 although its weights stay 16-bit: every top-level module (embeddings, each
    decoder layer, final norm, lm_head) has its floating parameters and buffers cast to float32 by a forward
    pre-hook and back to their own dtypes by a forward hook, so only one module is float32 at a time and the
    hidden states flow in float32. Nothing happens for a float32 model."""
    import torch

    from edgeprune.adapters import get_adapter

    if all(p.dtype == torch.float32 for p in model.parameters()):
        yield model
        return
    adapter = get_adapter(model)
    modules = [adapter.embed_tokens, *(layer.layer for layer in adapter.layers), adapter.final_norm,
               adapter.lm_head]
    saved: dict[int, list] = {}

    def up(module, _args):
        tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        saved[id(module)] = [(t, t.dtype) for t in tensors]
        with torch.inference_mode(False):  # plain tensors, usable outside inference mode afterwards
            for t in tensors:
                t.data = t.data.float()
            scale = getattr(module, "scalar_embed_scale", None)  # Gemma: the buffer was rounded to 16 bits at load
            if scale is not None and isinstance(getattr(module, "embed_scale", None), torch.Tensor):
                module.embed_scale.data = torch.tensor(scale, dtype=torch.float32, device=module.embed_scale.device)

    def down(module, _args, _out):
        with torch.inference_mode(False):
            for t, dt in saved.pop(id(module)):
                t.data = t.data.to(dt)  # exact: the float32 copy holds the 16-bit values

    handles = [h for m in modules for h in (m.register_forward_pre_hook(up), m.register_forward_hook(down))]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens after ``ids`` in llama.cpp (no EOS stop) and the seconds the decode steps took."""
    llm.reset()
    llm.eval(ids)
    out = []
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out, time.perf_counter() - t0


def _adds_bos(tok) -> bool:
    bos = getattr(tok, "bos_token_id", None)
    return bos is not None and tok("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _torch_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens (no EOS stop) and the top-1/top-2 logit gap at each step."""
    import torch

    out, margins = [], []
    with torch.inference_mode():
        res = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            logits_ = res.logits[0, -1].float()
            top = torch.topk(logits_, 2)
            nxt = int(top.indices[0])
            out.append(nxt)
            margins.append(float(top.values[0] - top.values[1]))
            cache = res["cache"] if "cache" in res else res.past_key_values  # transformers 5 renamed it
            res = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
    return out, margins
