"""Non-uniform allocators: LSPS (the paper's layer-aware sensitivity strategy), FLAP-style global ranking,
OWL-style outlier ratios and depth pruning (ShortGPT). All meet the global budget of removed decoder
parameters to within one MLP channel (depth: to within one layer)."""

from __future__ import annotations

import math

from edgeprune.allocation.base import (
    Allocation,
    Allocator,
    LayerAllocation,
    check_ratio,
    integerize,
    priced,
    register,
    solve_ratios,
    unit_costs,
)
from edgeprune.errors import EdgePruneError


@register
class LSPS(Allocator):
    """The paper's layer-aware sensitivity strategy (``allocate_lsps``)."""

    name = "lsps"
    needs_sensitivity = True

    def __init__(self, tau: float = 1.0, min_ratio: float = 0.0, max_ratio: float = 0.8, unit_cost=None):
        self.tau, self.min_ratio, self.max_ratio, self.unit_cost = tau, min_ratio, max_ratio, unit_cost

    @classmethod
    def from_config(cls, cfg, ratio):
        # a round's ratio may lie outside the user's module bounds (a small last round): widen them to it
        return cls(cfg.tau, min(cfg.min_module_ratio, ratio), max(cfg.max_module_ratio, ratio),
                   getattr(cfg, "unit_cost", None))

    def allocate(self, adapter, ratio, *, scores=None, sensitivities=None, attn_unit="group", round_to=1):
        if sensitivities is None:
            raise EdgePruneError("the lsps allocator needs layer sensitivities")
        return allocate_lsps(adapter, ratio, sensitivities, attn_unit, round_to, self.tau, self.min_ratio,
                             self.max_ratio, self.unit_cost)


@register
class GlobalRanking(Allocator):
    name = "global"
    needs_scores = True

    def allocate(self, adapter, ratio, *, scores=None, sensitivities=None, attn_unit="group", round_to=1):
        return allocate_global(adapter, ratio, scores, attn_unit, round_to)


@register
class OWL(Allocator):
    name = "owl"
    needs_block_stats = True

    def __init__(self, lam: float = 0.08):
        self.lam = lam

    def allocate(self, adapter, ratio, *, scores=None, sensitivities=None, attn_unit="group", round_to=1):
        return allocate_owl(adapter, ratio, scores, attn_unit, round_to, self.lam)


@register
class Depth(Allocator):
    name = "depth"
    needs_block_stats = True

    def allocate(self, adapter, ratio, *, scores=None, sensitivities=None, attn_unit="group", round_to=1):
        return allocate_depth(adapter, ratio, scores)


def _budget(costs, ratio: float) -> float:
    return ratio * sum(c.prunable for c in costs)


def allocate_lsps(adapter, ratio: float, sensitivities, attn_unit: str = "group", round_to: int = 1,
                  tau: float = 1.0, min_ratio: float = 0.0, max_ratio: float = 0.8, unit_cost=None) -> Allocation:
    """LSPS: every module (a layer's attention or MLP) gets a ratio r = clip(c * (s / mean s)^-tau,
    min_ratio, max_ratio), c chosen so the removed parameters meet the budget: sensitive modules lose less.
    tau = 0 is uniform; larger tau follows the sensitivities more closely.

    ``unit_cost``: per layer, [cost of one KV group, cost of one MLP channel] in any unit (e.g. measured decode
    milliseconds, edgeprune.fit): the budget is then ``ratio`` of the layers' total cost instead of their
    parameters, so the allocation cuts where that cost goes. Group units only."""
    check_ratio(ratio)
    if not 0 <= min_ratio <= ratio <= max_ratio < 1:
        raise EdgePruneError(f"need 0 <= --min-module-ratio <= ratio <= --max-module-ratio < 1 "
                             f"(got {min_ratio}, {ratio}, {max_ratio})")
    plain = unit_costs(adapter, attn_unit)
    costs = priced(plain, unit_cost, attn_unit)
    items, params, hi, density = [], [], [], []
    for c, c0, s in zip(costs, plain, sensitivities, strict=True):
        for kind, sens, p, p0, n in (
                ("attention", s.attention, c.attn_units * c.attn_unit_params, c0.attn_units * c0.attn_unit_params,
                 c.attn_units),
                ("mlp", s.mlp, c.channels * c.channel_params, c0.channels * c0.channel_params, c.channels)):
            items.append((c.index, kind, sens))
            params.append(p)
            density.append(p / p0 if p0 else 0.0)  # cost per parameter: 1 with the parameter budget
            hi.append(min(max_ratio, (n - 1) / n) if n else 0.0)
    # with a cost per unit, sensitivity is per unit of cost saved: modules whose parameters cost more lose more
    mean_d = sum(density) / max(1, sum(1 for d in density if d)) or 1.0
    items = [(i, k, s * mean_d / d if d else s) for (i, k, s), d in zip(items, density, strict=True)]
    positive = [s for _, _, s in items if s > 0]
    mean = sum(positive) / len(positive) if positive else 1.0
    floor = (min(positive) if positive else 1.0) * 1e-3
    weights = [(max(s, floor) / mean) ** (-tau) for _, _, s in items]
    budget = _budget(costs, ratio)
    ratios = solve_ratios(weights, params, budget, min_ratio, hi)
    attn_r, mlp_r = ratios[0::2], ratios[1::2]
    return integerize(costs, attn_r, mlp_r, budget, attn_unit, round_to)


def allocate_global(adapter, ratio: float, scores, attn_unit: str = "group", round_to: int = 1) -> Allocation:
    """FLAP-style: standardise each layer's unit scores per kind ((s - mean) / std), rank all units of all
    layers together and remove the lowest until the budget is met (at least one unit of each module stays)."""
    import torch

    check_ratio(ratio)
    costs = unit_costs(adapter, attn_unit)
    budget = _budget(costs, ratio)
    pool = []
    for c, s in zip(costs, scores.layers, strict=True):
        attn = s.groups if attn_unit == "group" else _per_position(s.heads, c.attn_units)
        for kind, t, cost in (("attention", attn, c.attn_unit_params), ("mlp", s.channels, c.channel_params)):
            if t is None or t.numel() < 2:
                continue
            z = (t - t.mean()) / (t.std() + 1e-12)
            # keep the best unit of each module out of the pool
            keep = int(torch.argmax(t))
            pool += [(float(z[i]), c.index, kind, cost) for i in range(t.numel()) if i != keep]
    pool.sort(key=lambda x: x[0])
    counts = {c.index: {"attention": 0, "mlp": 0} for c in costs}
    removed = 0.0
    for _, idx, kind, cost in pool:
        if removed + cost / 2 > budget:
            if kind == "attention":
                continue  # a whole attention unit would overshoot: let channels fill the rest
            break
        counts[idx][kind] += 1
        removed += cost
    attn_r = [counts[c.index]["attention"] / c.attn_units if c.attn_units else 0 for c in costs]
    mlp_r = [counts[c.index]["mlp"] / c.channels if c.channels else 0 for c in costs]
    return integerize(costs, attn_r, mlp_r, budget, attn_unit, round_to)


def _per_position(heads, g: int):
    """Head-unit importance by position within the group (the same position goes from every group)."""
    if heads is None:
        return None
    return heads.view(-1, g).sum(0)


def allocate_owl(adapter, ratio: float, scores, attn_unit: str = "group", round_to: int = 1,
                 lam: float = 0.08) -> Allocation:
    """OWL: layers with a larger share of outlier features (Wanda score > 5x the layer mean) are pruned less;
    ratios span [ratio - lam, ratio + lam] before the budget is met exactly."""
    check_ratio(ratio)
    costs = unit_costs(adapter, attn_unit)
    d = [s.blocks.get("outliers") for s in scores.layers]
    if any(x is None for x in d):
        raise EdgePruneError("the owl allocator needs a scorer that reads activations")
    lo, hi = min(d), max(d)
    spread = [(x - lo) / (hi - lo) if hi > lo else 0.5 for x in d]
    target = [ratio + lam - 2 * lam * s for s in spread]
    params = [c.prunable for c in costs]
    budget = _budget(costs, ratio)
    ratios = solve_ratios(target, params, budget, 0.0, [0.95] * len(costs))
    return integerize(costs, ratios, ratios, budget, attn_unit, round_to)


def allocate_depth(adapter, ratio: float, scores) -> Allocation:
    """ShortGPT: drop the whole layers with the lowest Block Influence, as many as the budget asks for."""
    check_ratio(ratio)
    costs = unit_costs(adapter, "group")
    bi = [s.blocks.get("layer") for s in scores.layers]
    if any(x is None for x in bi):
        raise EdgePruneError("the depth allocator needs a scorer that reads activations")
    budget = _budget(costs, ratio)
    per_layer = sum(c.prunable + c.fixed_params for c in costs) / len(costs)
    n = min(int(math.floor(budget / per_layer + 0.5)), len(costs) - 1)
    drop = set(sorted(range(len(costs)), key=lambda i: bi[i])[:n])
    layers, removed = [], 0
    for c in costs:
        dropped = c.index in drop
        if dropped:
            removed += c.prunable + c.fixed_params
        layers.append(LayerAllocation(c.index, 0, 0, dropped, 1.0 if dropped else 0.0))
    return Allocation("group", layers, removed, int(round(budget)))
