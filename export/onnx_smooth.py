"""SmoothQuant for the ``smooth-hybrid`` INT8 recipe: move activation outliers of a torch model into its weights,
in place, before the model is traced.

It does not quantize anything (``onnx_quant.py`` does, on the traced graph).
"""

from __future__ import annotations

SMOOTH_ALPHA = 0.75


def smooth_model(lm, alpha: float = SMOOTH_ALPHA, n_samples: int = 16, seq_len: int = 128) -> dict:
    """SmoothQuant, in place: move activation outliers into the weights where a norm can absorb the scale.

    For the attention input (input_layernorm -> q/k/v) and the MLP input (post_attention_layernorm -> gate/up)
    of every layer that has the block: s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) on calibration text
    (edgeprune's builtin text), norm weight / s, W * s. The float model computes the same function; its int8
    activations get a range per-tensor quantization can cover.
    """
    import torch

    from edgeprune.data import calibration_batches, load_text

    batches = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), n_samples, seq_len)
    amax: dict = {}

    def hook(key):
        def record(module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
            amax[key] = torch.maximum(amax[key], x) if key in amax else x
        return record

    hooks = []
    for layer in lm.adapter.layers:
        if layer.has_attention:
            hooks.append(layer.attention_projections().q.register_forward_pre_hook(hook(("attn", layer.index))))
        if layer.has_mlp:
            hooks.append(layer.mlp_projections().gate.register_forward_pre_hook(hook(("mlp", layer.index))))
    try:
        with torch.no_grad():
            for b in range(0, batches.shape[0], 4):
                lm.model(input_ids=batches[b : b + 4], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    blocks = 0
    offset = lm.adapter.spec.norm_offset  # Gemma's RMSNorm scales by (1 + w)
    with torch.no_grad():
        for layer in lm.adapter.layers:
            if layer.has_attention:
                _fold(amax[("attn", layer.index)], layer.attention_input_norm, _qkv(layer), alpha, offset)
                blocks += 1
            if layer.has_mlp:
                _fold(amax[("mlp", layer.index)], layer.mlp_input_norm, _gate_up(layer), alpha, offset)
                blocks += 1
    return {"alpha": alpha, "calibration": list(batches.shape), "blocks": blocks}


def _qkv(layer) -> list:
    a = layer.attention_projections()
    return [a.q, a.k, a.v]


def _gate_up(layer) -> list:
    m = layer.mlp_projections()
    return [m.gate, m.up]


def _fold(act, norm, linears, alpha: float, offset: float = 0.0) -> None:
    """Move a per-channel scale s from the activations into the weights: the norm's effective scale
    (offset + w) is divided by s, the following projections' input columns multiplied by it."""
    import torch

    w = torch.cat([lin.weight.detach().abs() for lin in linears], 0).amax(0).float()
    s = (act.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    norm.weight.copy_((norm.weight + offset) / s.to(norm.weight.dtype) - offset)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
