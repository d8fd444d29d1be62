"""How much to remove where. An allocator turns a global budget (the fraction of decoder-layer parameters to
remove) into per-layer unit counts; it never decides *which* units (scores do) nor cuts anything (surgery)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

from edgeprune.errors import EdgePruneError

ATTN_UNITS = ("group", "head")


class Allocator:
    """Turns a budget into per-layer unit counts. The capability flags say what ``allocate`` reads, so the
    driver (edgeprune/prune.py) computes only that: unit scores, block statistics from an activation pass
    (Block Influence, outlier ratios), per-module sensitivities."""

    name: ClassVar[str] = ""
    needs_scores: ClassVar[bool] = False
    needs_block_stats: ClassVar[bool] = False
    needs_sensitivity: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg, ratio: float) -> Allocator:
        """The allocator for one round of ``cfg`` (a PruneConfig) that removes ``ratio`` of the current model."""
        return cls()

    def allocate(self, adapter, ratio: float, *, scores=None, sensitivities=None, attn_unit: str = "group",
                 round_to: int = 1) -> Allocation:
        raise NotImplementedError


ALLOCATORS: dict[str, type[Allocator]] = {}


def register(cls: type[Allocator]) -> type[Allocator]:
    ALLOCATORS[cls.name] = cls
    return cls


@dataclass
class UnitCosts:
    """The prunable units of one layer and what each costs in parameters."""

    index: int
    attn_units: int  # groups: KV heads; heads: query heads per group (removed from every group at once)
    attn_unit_params: int
    channels: int
    channel_params: int
    fixed_params: int  # norms and the like, never pruned by width

    @property
    def prunable(self) -> int:
        return self.attn_units * self.attn_unit_params + self.channels * self.channel_params


def unit_costs_layer(layer, attn_unit: str = "group") -> UnitCosts:
    """What each prunable unit of one layer costs in parameters."""
    from edgeprune.models.info import layer_param_counts

    hidden = layer.attention_input_norm.weight.shape[0]
    d, g, kv = layer.head_dim, layer.group_size, layer.num_kv_heads
    q_bias = 1 if layer.has_attention and layer.biases.q else 0
    head_params = 2 * d * hidden + q_bias * d  # q rows and o columns of one query head
    kv_params = 2 * d * hidden + 2 * q_bias * d  # k and v rows of one KV head
    if not layer.has_attention:
        n_attn, attn_cost = 0, 0
    elif attn_unit == "group":
        n_attn, attn_cost = kv, g * head_params + kv_params
    else:
        n_attn, attn_cost = g, kv * head_params
    gate_bias = 1 if layer.has_mlp and layer.biases.gate else 0
    counts = layer_param_counts(layer)
    return UnitCosts(layer.index, n_attn, attn_cost, layer.intermediate_size, 3 * hidden + 2 * gate_bias,
                     counts["norms"])


def unit_costs(adapter, attn_unit: str = "group") -> list[UnitCosts]:
    if attn_unit not in ATTN_UNITS:
        raise EdgePruneError(f"unknown attention unit '{attn_unit}'; choose from {', '.join(ATTN_UNITS)}")
    return [unit_costs_layer(layer, attn_unit) for layer in adapter.layers]


def prunable_total(adapter, unit_cost=None) -> float:
    """The model's prunable budget (parameters, or the unit cost's units): what a round's ratio is a share of."""
    return sum(c.prunable for c in priced(unit_costs(adapter), unit_cost))


def priced(costs, unit_cost, attn_unit: str = "group"):
    """``costs`` with each unit's parameters replaced by ``unit_cost`` (per layer: [group, channel]); unchanged
    when ``unit_cost`` is None."""
    if unit_cost is None:
        return costs
    if attn_unit != "group" or len(unit_cost) != len(costs):
        raise EdgePruneError("a cost per unit needs --attn-unit group and one [group, channel] pair per layer")
    return [replace(c, attn_unit_params=float(g), channel_params=float(ch))
            for c, (g, ch) in zip(costs, unit_cost, strict=True)]


@dataclass
class LayerAllocation:
    """Units to remove from one layer."""

    index: int
    attn_units: int
    channels: int
    drop: bool = False
    ratio: float = 0.0  # fraction of the layer's prunable parameters removed


@dataclass
class Allocation:
    attn_unit: str
    layers: list[LayerAllocation]
    removed_params: int
    budget_params: int

    def to_dict(self) -> dict:
        return {"attn_unit": self.attn_unit, "removed_params": self.removed_params,
                "budget_params": self.budget_params, "layers": [asdict(x) for x in self.layers]}


def round_kept(kept: int, multiple: int, total: int) -> int:
    """Round a kept width to a multiple (hardware-friendly shapes), never to 0 and never above ``total``."""
    if multiple <= 1:
        return kept
    r = max(multiple, int(round(kept / multiple)) * multiple)
    return min(r, total)


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise EdgePruneError(f"--ratio must be in [0, 1), got {ratio}")


def largest_remainder(desired: list[float], upper: list[int], total: int) -> list[int]:
    """Integers n_i <= upper_i close to ``desired`` whose sum is ``total`` (Hamilton's method, bounded)."""
    n = [min(int(d), u) for d, u in zip(desired, upper, strict=True)]
    order = sorted(range(len(desired)), key=lambda i: -(desired[i] - int(desired[i])))
    missing = total - sum(n)
    while missing > 0:
        progressed = False
        for i in order:
            if missing == 0:
                break
            if n[i] < upper[i]:
                n[i] += 1
                missing -= 1
                progressed = True
        if not progressed:
            break
    return n


def integerize(costs: list[UnitCosts], attn_ratio: list[float], mlp_ratio: list[float], budget: float,
               attn_unit: str, round_to: int = 1, min_attn_units: int = 1, min_channels: int = 1) -> Allocation:
    """Per-module target ratios -> unit counts whose total removed parameters is ``budget`` to within one MLP
    channel (unless bounds prevent it). Attention goes in whole units (largest remainder across layers); the
    MLP absorbs the difference, spread in proportion to each layer's MLP target."""
    upper_a = [max(c.attn_units - min_attn_units, 0) for c in costs]
    desired_a = [min(r * c.attn_units, u) for r, c, u in zip(attn_ratio, costs, upper_a, strict=True)]
    a = largest_remainder(desired_a, upper_a, int(round(sum(desired_a))))
    attn_removed = sum(n * c.attn_unit_params for n, c in zip(a, costs, strict=True))
    mlp_target = [r * c.channels * c.channel_params for r, c in zip(mlp_ratio, costs, strict=True)]
    left = max(budget - attn_removed, 0.0)
    scale = left / sum(mlp_target) if sum(mlp_target) > 0 else 0.0
    upper_c = [max(c.channels - min_channels, 0) for c in costs]
    desired_c = [min(t * scale / c.channel_params if c.channel_params else 0.0, u)
                 for t, c, u in zip(mlp_target, costs, upper_c, strict=True)]
    channel_cost = costs[0].channel_params if costs else 1
    ch = largest_remainder(desired_c, upper_c, int(round(left / channel_cost)) if channel_cost else 0)
    if round_to > 1:
        ch = [c.channels - round_kept(c.channels - n, round_to, c.channels) for n, c in zip(ch, costs, strict=True)]
    layers, removed = [], 0
    for c, na, nc in zip(costs, a, ch, strict=True):
        r = na * c.attn_unit_params + nc * c.channel_params
        removed += r
        layers.append(LayerAllocation(c.index, na, nc, False, r / c.prunable if c.prunable else 0.0))
    return Allocation(attn_unit, layers, removed, int(round(budget)))


def solve_ratios(weights: list[float], params: list[float], budget: float, lo: float, hi: list[float]) -> list[float]:
    """Ratios r_i = clip(c * w_i, lo, hi_i) with sum r_i * params_i = budget (bisection on c)."""
    cap = sum(h * p for h, p in zip(hi, params, strict=True))
    if budget > cap + 1e-6:
        raise EdgePruneError("the ratio cannot be met within the per-module bounds; raise --max-module-ratio")

    def removed(c):
        return sum(min(max(c * w, lo), h) * p for w, h, p in zip(weights, hi, params, strict=True))

    lo_c, hi_c = 0.0, 1.0
    while removed(hi_c) < budget and hi_c < 1e12:
        hi_c *= 2
    for _ in range(200):
        mid = (lo_c + hi_c) / 2
        if removed(mid) < budget:
            lo_c = mid
        else:
            hi_c = mid
    return [min(max(hi_c * w, lo), h) for w, h in zip(weights, hi, strict=True)]
