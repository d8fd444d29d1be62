"""Unit scores and the scorer interface.

Structural units of a layer: query heads, KV-head groups (a KV head and the query heads that share it) and MLP
channels (a row of gate/up and the matching column of down). A scorer says how important each unit is; it does
not decide how many units go (that is the allocator's job) nor cut anything (surgery's job).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerUnitScores:
    groups: torch.Tensor | None  # [num_kv_heads]; None when the layer has no attention
    heads: torch.Tensor | None  # [num_heads]
    channels: torch.Tensor | None  # [intermediate_size]; None when the layer has no MLP
    blocks: dict[str, float] = field(default_factory=dict)  # Block Influence of layer / attention / MLP

    def to_dict(self) -> dict:
        def lst(t):
            return None if t is None else [float(x) for x in t]

        return {"groups": lst(self.groups), "heads": lst(self.heads), "channels": lst(self.channels),
                "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict) -> LayerUnitScores:
        def ten(x):
            return None if x is None else torch.tensor(x, dtype=torch.float64)

        return cls(ten(d["groups"]), ten(d["heads"]), ten(d["channels"]), d.get("blocks", {}))


@dataclass
class UnitScores:
    scorer: str
    layers: list[LayerUnitScores]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"scorer": self.scorer, "meta": self.meta, "layers": [s.to_dict() for s in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> UnitScores:
        return cls(d["scorer"], [LayerUnitScores.from_dict(x) for x in d["layers"]], d.get("meta", {}))


class Scorer:
    """Importance of every unit of a layer. Higher means more important (pruned last)."""

    name: str = ""
    needs_activations: bool = False
    needs_gradients: bool = False

    def score_layer(self, layer, stats, grads) -> LayerUnitScores:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}


# ---- reductions from per-element / per-feature tensors to units -------------------------------------

def reduce_weights(layer, q=None, k=None, v=None, o=None, gate=None, up=None, down=None):
    """Sum per-element tensors shaped like the projection weights into (groups, heads, channels)."""
    groups = heads = channels = None
    if layer.has_attention:
        h, kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        heads = q.view(h, d, -1).sum((1, 2)) + o.view(o.shape[0], h, d).sum((0, 2))
        kv_part = k.view(kv, d, -1).sum((1, 2)) + v.view(kv, d, -1).sum((1, 2))
        groups = heads.view(kv, h // kv).sum(1) + kv_part
    if layer.has_mlp:
        channels = gate.sum(1) + up.sum(1) + down.sum(0)
    return groups, heads, channels


def reduce_features(layer, attn_feat=None, mlp_feat=None):
    """Sum per-input-feature tensors of o_proj / down_proj into (groups, heads, channels)."""
    groups = heads = channels = None
    if layer.has_attention and attn_feat is not None:
        h, kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        heads = attn_feat.view(h, d).sum(1)
        groups = heads.view(kv, h // kv).sum(1)
    if layer.has_mlp and mlp_feat is not None:
        channels = mlp_feat
    return groups, heads, channels


def block_scores(stats) -> dict[str, float]:
    if stats is None:
        return {}
    return {"layer": stats.bi_layer, "attention": stats.bi_attn, "mlp": stats.bi_mlp}


def normalise(t: torch.Tensor | None) -> torch.Tensor | None:
    """Scale a layer's unit scores to mean 1, so terms of different units are comparable and combinable."""
    if t is None:
        return None
    t = t.double()
    m = t.abs().mean()
    return t / m if m > 0 else t


def outlier_ratio(layer, stats, m: float = 5.0) -> float:
    """OWL's layer outlier ratio: the share of Wanda scores |W_ij| * ||X_j|| above m times their layer mean."""
    pairs = []
    if layer.has_attention:
        a = layer.attention_projections()
        pairs += [(a.q, stats.attn_x), (a.k, stats.attn_x), (a.v, stats.attn_x), (a.o, stats.attn_in)]
    if layer.has_mlp:
        mp = layer.mlp_projections()
        pairs += [(mp.gate, stats.mlp_x), (mp.up, stats.mlp_x), (mp.down, stats.mlp_in)]
    mats = [lin.weight.detach().abs().double() * s.sumsq.sqrt()[None, :] for lin, s in pairs]
    if not mats:
        return 0.0
    total = sum(x.sum() for x in mats)
    count = sum(x.numel() for x in mats)
    mean = total / count
    return float(sum((x > m * mean).sum() for x in mats) / count)
