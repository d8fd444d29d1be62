"""Uniform allocation: every layer loses the same fraction of its prunable parameters.

Attention is removed in whole units (KV groups or query heads per group), so its share is rounded to the
nearest unit (at least one unit always stays); the MLP absorbs the rounding so that each layer still meets
the ratio to within one channel."""

from __future__ import annotations

from edgeprune.allocation.base import (
    Allocation,
    Allocator,
    LayerAllocation,
    check_ratio,
    register,
    round_kept,
    unit_costs,
)
from edgeprune.errors import EdgePruneError


@register
class Uniform(Allocator):
    name = "uniform"

    def allocate(self, adapter, ratio, *, scores=None, sensitivities=None, attn_unit="group", round_to=1):
        return allocate_uniform(adapter, ratio, attn_unit, round_to)


def allocate_uniform(adapter, ratio: float, attn_unit: str = "group", round_to: int = 1,
                     prune_attention: bool = True) -> Allocation:
    check_ratio(ratio)
    layers, removed, budget = [], 0, 0
    for c in unit_costs(adapter, attn_unit):
        target = ratio * c.prunable
        budget += round(target)
        a = 0
        if prune_attention and c.attn_units:
            a = min(int(round(ratio * c.attn_units)), c.attn_units - 1)
        rest = max(0.0, target - a * c.attn_unit_params)
        ch = int(round(rest / c.channel_params)) if c.channel_params else 0
        if ch >= c.channels and c.channels:
            raise EdgePruneError(
                f"ratio {ratio} would remove every MLP channel of layer {c.index}; use a smaller ratio")
        kept = round_kept(c.channels - ch, round_to, c.channels)
        ch = c.channels - kept
        r = a * c.attn_unit_params + ch * c.channel_params
        removed += r
        layers.append(LayerAllocation(c.index, a, ch, False, r / c.prunable if c.prunable else 0.0))
    return Allocation(attn_unit, layers, removed, budget)
