"""Turn scores and an allocation into a PruningPlan: in each layer, the lowest-scored units go."""

from __future__ import annotations

import torch

from edgeprune.allocation.base import Allocation
from edgeprune.errors import EdgePruneError
from edgeprune.plan import LayerPlan, PruningPlan
from edgeprune.scoring.base import UnitScores


def _keep_top(scores: torch.Tensor, n_keep: int) -> list[int]:
    # stable: ties keep the lower index, so plans are deterministic
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:n_keep])


def build_plan(adapter, scores: UnitScores, allocation: Allocation) -> PruningPlan:
    if len(scores.layers) != len(adapter.layers):
        raise EdgePruneError(f"scores cover {len(scores.layers)} layers, the model has {len(adapter.layers)}")
    plans = []
    for layer, s, alloc in zip(adapter.layers, scores.layers, allocation.layers, strict=True):
        heads, kv = list(range(layer.num_heads)), list(range(layer.num_kv_heads))
        channels = list(range(layer.intermediate_size))
        if alloc.drop:
            plans.append(LayerPlan(layer.index, heads, kv, channels, drop=True))
            continue
        if alloc.attn_units and layer.has_attention:
            g = layer.group_size
            if allocation.attn_unit == "group":
                kv = _keep_top(s.groups, layer.num_kv_heads - alloc.attn_units)
                heads = [h for h in heads if h // g in kv]
            else:  # the same number of query heads leaves every group
                heads = []
                for k in kv:
                    local = _keep_top(s.heads[k * g:(k + 1) * g], g - alloc.attn_units)
                    heads += [k * g + i for i in local]
        if alloc.channels and layer.has_mlp:
            channels = _keep_top(s.channels, layer.intermediate_size - alloc.channels)
        plans.append(LayerPlan(layer.index, heads, kv, channels))
    return PruningPlan(plans, {"attn_unit": allocation.attn_unit})
