"""Tracing a model to a float32 ONNX graph with a KV cache (the graph interface is described in ``onnx.py``).

The exporter is torch's TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) applied to a small wrapper
module: it takes the flat past tensors, builds a transformers ``DynamicCache`` from them, runs the unmodified
Hugging Face model and returns logits and the flat presents. The wrapper builds the 4-D additive attention mask
itself (causal + padding, + sliding window where the family uses one) and hands it to the model, so no
data-dependent branch of transformers' mask code is baked into the trace. (The dynamo exporter needs
``onnxscript``, which is not a dependency.) The graph is traced without its parameters and the weights are
written tensor by tensor (``onnx_weights.py``); a graph input that cannot be mapped falls back to a full trace.

It does not convert, quantize or check the graph, nor publish the export directory (``onnx.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeprune.export.onnx_files import MODEL_FILE, save_model
from edgeprune.export.onnx_weights import UnresolvedWeight, attach_weights

OPSET = 17


def _wrapper(model, kv_layers: list[int], spec):
    """``spec``: the family's row of ``edgeprune.adapters.families`` (how it chooses sliding-window layers)."""
    import torch
    from torch import nn
    from transformers import DynamicCache

    config = model.config
    n_layers = config.num_hidden_layers
    head_dim = config.head_dim
    window = getattr(config, "sliding_window", None)
    if spec.sliding_window == "use_sliding_window" and not getattr(config, "use_sliding_window", False):
        window = None
    if not spec.sliding_window:
        window = None
    layer_types = list(getattr(config, "layer_types", None) or [])

    class OnnxWrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            b, q = input_ids.shape
            dtype = self.model.model.embed_tokens.weight.dtype
            kv = attention_mask.shape[1]
            # causal by index in the key sequence (the queries are its last q entries), plus padding
            k_idx = torch.arange(kv, device=input_ids.device).view(1, kv)
            q_idx = (torch.arange(q, device=input_ids.device) + (kv - q)).view(q, 1)
            allowed = k_idx <= q_idx
            pad = attention_mask.to(torch.bool).view(b, 1, 1, kv)
            full = allowed.view(1, 1, q, kv) & pad
            neg = torch.finfo(dtype).min

            def additive(m):
                return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, neg)

            mask = additive(full)
            if window:
                sliding = additive(full & (q_idx - k_idx < window).view(1, 1, q, kv))
                if spec.sliding_window == "all":
                    mask = sliding
                elif layer_types:  # the model picks each layer's mask by config.layer_types
                    mask = {"full_attention": mask, "sliding_attention": sliding}
            cache = DynamicCache()
            it = iter(past)
            pos = {i: j for j, i in enumerate(kv_layers)}
            for i in range(n_layers):
                if i in pos:
                    k, v = next(it), next(it)
                else:  # a layer without attention: an empty stand-in, never read
                    k = v = torch.zeros(b, 0, 0, head_dim, dtype=dtype)
                cache.update(k, v, i)
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                             use_cache=True)
            flat = []
            for i in kv_layers:
                layer = cache.layers[i]
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return OnnxWrapper().eval()


class _traceable_rope:
    """GLM's interleaved RoPE repeats cos/sin with ``repeat_interleave``, whose TorchScript ONNX symbolic loses the
    tensor rank (the export then fails in ``cat``). While tracing, the family's ``apply_rotary_pos_emb`` is swapped
    for the same computation written with stack + flatten; the parity check compares against the original."""

    def __init__(self, spec):
        self.mod = None
        if spec.rope_interleaved:
            import importlib

            self.mod = importlib.import_module(f"transformers.models.{spec.hf_module}.modeling_{spec.hf_module}")

    def __enter__(self):
        if self.mod is not None:
            self.old = self.mod.apply_rotary_pos_emb
            self.mod.apply_rotary_pos_emb = _interleaved_rope

    def __exit__(self, *exc):
        if self.mod is not None:
            self.mod.apply_rotary_pos_emb = self.old


def _interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' GLM ``apply_rotary_pos_emb`` (partial, interleaved pairs), traceable to ONNX."""
    import torch

    def pairs(t):  # (c0, c1, ...) -> (c0, c0, c1, c1, ...) over the first half
        t = t.unsqueeze(unsqueeze_dim)[..., : t.shape[-1] // 2]
        return torch.stack((t, t), dim=-1).flatten(-2)

    def rotate(x):
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)

    cos, sin = pairs(cos), pairs(sin)
    d = cos.shape[-1]
    q_rot, k_rot = q[..., :d], k[..., :d]
    q_embed = torch.cat([q_rot * cos + rotate(q_rot) * sin, q[..., d:]], dim=-1)
    k_embed = torch.cat([k_rot * cos + rotate(k_rot) * sin, k[..., d:]], dim=-1)
    return q_embed, k_embed


def _io_names(kv_layers: list[int]) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in kv_layers for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in kv_layers for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _kv_layout(lm) -> tuple[list[int], list[int]]:
    shapes = lm.adapter.shapes()
    kv_layers = [i for i, s in enumerate(shapes) if s.num_kv_heads > 0]
    return kv_layers, [shapes[i].num_kv_heads for i in kv_layers]


def trace_fp32(lm, path: Path) -> dict:
    """Trace ``lm`` to ``path`` (float32, KV cache)."""
    import warnings

    import onnx
    import torch

    model = lm.model
    model.config.use_cache = True
    kv_layers, kv_heads = _kv_layout(lm)
    head_dim = lm.adapter.head_dim
    wrapper = _wrapper(model, kv_layers, lm.adapter.spec)
    # a left-padded batch with a non-empty past: the traced path is the general one (every size is dynamic)
    b, s, p = 2, 7, 5
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    past = []
    for h in kv_heads:
        past += [torch.randn(b, h, p, head_dim, generator=g), torch.randn(b, h, p, head_dim, generator=g)]
    in_names, out_names = _io_names(kv_layers)
    dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"},
           "logits": {0: "batch_size", 1: "sequence_length"}}
    for name in in_names[3:]:
        dyn[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in out_names[1:]:
        dyn[name] = {0: "batch_size", 2: "total_sequence_length"}
    export_kw = dict(dynamo=False, input_names=in_names, output_names=out_names, dynamic_axes=dyn,
                     opset_version=OPSET, do_constant_folding=True)
    scratch = path.parent / ".trace"
    scratch.mkdir()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _traceable_rope(lm.adapter.spec):
            warnings.simplefilter("ignore")
            try:  # the graph alone; its weights are written tensor by tensor (export/onnx_weights.py)
                torch.onnx.export(wrapper, (ids, mask, pos, *past), str(scratch / MODEL_FILE), export_params=False,
                                  **export_kw)
                proto = onnx.load(str(scratch / MODEL_FILE), load_external_data=False)
                weights = attach_weights(proto, wrapper, path, len(in_names), lm.adapter.spec.norm_offset)
                how = "graph traced without parameters, weights written tensor by tensor"
            except UnresolvedWeight:  # a graph input we cannot map: trace with the weights inside
                torch.onnx.export(wrapper, (ids, mask, pos, *past), str(scratch / MODEL_FILE), **export_kw)
                weights = save_model(onnx.load(str(scratch / MODEL_FILE), load_external_data=True), path)
                how = "full trace"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"kv_layers": kv_layers, "kv_heads": kv_heads, "head_dim": head_dim, "weights": how,
            "weight_bytes": weights["weight_bytes"], "shared_tied_head": weights.get("shared_tied_head", False)}
