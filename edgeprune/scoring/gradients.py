"""The gradient (first-order Taylor) term without full-size gradients.

A hook on every decoder projection weight (``register_post_accumulate_grad_hook``) folds the weight's gradient
into per-unit sums of |w * dL/dw| as soon as the backward pass has produced it, then frees it (``p.grad = None``).
Gradient checkpointing of the decoder layers keeps one micro-batch's layer inputs and recomputes the rest during
the backward pass. Peak memory: the model in its working dtype, one micro-batch's checkpointed layer inputs and one layer's
recomputed activations, chunks of float32 logits (``calibration.chunked_next_token_loss``: the full-vocabulary
logits are never formed), one projection's gradient with a few MiB of float32 products at a time, and O(units)
float64 accumulators.

The sum is taken per backward pass (micro-batch b): the term is sum_b sum_{w in u} |w * g_b|. With one backward
pass over all calibration windows this is exactly the full-gradient Taylor score |w * sum_b g_b| summed over the
unit (``accumulate_gradients`` + ``TaylorScorer``); with several it also counts gradient components that cancel
between micro-batches (measured on the default model in README "Scale"). Not done here: gradients of the
embeddings or norms (no scorer reads them).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from edgeprune.adapters.base import weight_source
from edgeprune.scoring.base import LayerUnitScores, chunked_unit_sums
from edgeprune.scoring.calibration import backward_next_token_loss


class UnitTaylor:
    """Per-unit Taylor sums of every decoder layer, filled by the hooks; read by TaylorScorer (and the fisher
    sensitivity) in place of full gradients."""

    def __init__(self):
        self.parts: dict[int, dict[str, torch.Tensor]] = {}
        self.backward_passes = 0

    def add(self, layer, name: str, weight: torch.Tensor, grad: torch.Tensor) -> None:
        def prod(rows):  # float32 products of one chunk of rows (whole heads), float64 sums
            return (weight[rows].detach().float() * grad[rows].float()).abs_()

        part = chunked_unit_sums(layer, name, weight.shape, prod, torch.float64)
        parts = self.parts.setdefault(layer.index, {})
        parts[name] = part if name not in parts else parts[name] + part

    def layer_scores(self, layer, blocks: dict | None = None) -> LayerUnitScores:
        p = self.parts.get(layer.index, {})
        groups = heads = channels = None
        if layer.has_attention:
            heads = p["q"] + p["o"]
            groups = heads.view(layer.num_kv_heads, layer.group_size).sum(1) + p["k"] + p["v"]
        if layer.has_mlp:
            channels = p["gate"] + p["up"] + p["down"]
        return LayerUnitScores(groups, heads, channels, blocks or {})


def _projections(layer) -> list[tuple[str, torch.nn.Linear]]:
    mods = []
    if layer.has_attention:
        mods += list(layer.attention_projections()._asdict().items())
    if layer.has_mlp:
        mods += list(layer.mlp_projections()._asdict().items())
    return mods


@contextmanager
def checkpointed_layers(adapter):
    """Gradient checkpointing of the decoder layers (transformers' ``gradient_checkpointing_enable``) while the
    model stays in eval mode: only the decoder-layer modules themselves are flagged as training, because
    transformers checkpoints a layer only when it is; their dropout submodules stay in eval mode."""
    model = adapter.model
    layers = [layer.layer for layer in adapter.layers]
    supported = getattr(model, "supports_gradient_checkpointing", False) and all(
        hasattr(m, "gradient_checkpointing") for m in layers)
    if not supported:  # the pass still works, with every activation kept
        yield False
        return
    was = [m.training for m in layers]
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for m in layers:
        m.training = True  # not .train(): that would recurse into the layer's dropout modules
    try:
        yield True
    finally:
        for m, flag in zip(layers, was, strict=True):
            m.training = flag
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
        if hasattr(model, "disable_input_require_grads"):  # enable() hooks the embeddings; do not leave it behind
            model.disable_input_require_grads()


def unit_taylor(adapter, batches: torch.Tensor, micro_batch: int = 4, checkpointing: bool = True,
                progress: bool = True) -> UnitTaylor:
    """Per-unit sums of |w * dL/dw_b| over the micro-batches b of ``batches`` for every decoder projection,
    where L is the mean next-token loss over all of ``batches`` (so the per-token scale matches
    ``accumulate_gradients``). No full-size gradient outlives its hook."""
    model = adapter.model
    acc = UnitTaylor()
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    # fused projections (Phi-3's qkv_proj, gate_up_proj) share one parameter: one hook folds every role's rows
    roles: dict[int, tuple[torch.nn.Parameter, list]] = {}
    for layer in adapter.layers:
        for name, mod in _projections(layer):
            param, rows = weight_source(mod)
            roles.setdefault(id(param), (param, []))[1].append((layer, name, rows))
    handles = []
    for param, uses in roles.values():
        param.requires_grad_(True)
        param.grad = None

        def fold(p, uses=uses):
            for layer, name, rows in uses:
                acc.add(layer, name, p[rows], p.grad[rows])
            p.grad = None

        handles.append(param.register_post_accumulate_grad_hook(fold))
    try:
        with checkpointed_layers(adapter) if checkpointing else _null():
            acc.backward_passes += backward_next_token_loss(model, batches, micro_batch, progress)
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags.get(id(p), True))
    return acc


@contextmanager
def _null():
    yield False
