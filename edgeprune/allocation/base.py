"""How much to remove where. An allocator turns a global budget (the fraction of decoder-layer parameters to
remove) into per-layer unit counts; it never decides *which* units (scores do) nor cuts anything (surgery)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgeprune.errors import EdgePruneError

ATTN_UNITS = ("group", "head")


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


def unit_costs(adapter, attn_unit: str = "group") -> list[UnitCosts]:
    if attn_unit not in ATTN_UNITS:
        raise EdgePruneError(f"unknown attention unit '{attn_unit}'; choose from {', '.join(ATTN_UNITS)}")
    from edgeprune.models.info import layer_param_counts

    out = []
    hidden = adapter.hidden_size
    for layer in adapter.layers:
        d, g, kv = layer.head_dim, layer.group_size, layer.num_kv_heads
        q_bias = 1 if layer.has_attention and layer.attention_projections()[0].bias is not None else 0
        head_params = 2 * d * hidden + q_bias * d  # q rows and o columns of one query head
        kv_params = 2 * d * hidden + 2 * q_bias * d  # k and v rows of one KV head
        if not layer.has_attention:
            n_attn, attn_cost = 0, 0
        elif attn_unit == "group":
            n_attn, attn_cost = kv, g * head_params + kv_params
        else:
            n_attn, attn_cost = g, kv * head_params
        gate_bias = 1 if layer.has_mlp and layer.mlp_projections()[0].bias is not None else 0
        counts = layer_param_counts(layer)
        out.append(UnitCosts(layer.index, n_attn, attn_cost, layer.intermediate_size,
                             3 * hidden + 2 * gate_bias, counts["norms"]))
    return out


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
