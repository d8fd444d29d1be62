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

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def unit_sums(layer, role: str, t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A per-element tensor shaped like projection ``role``'s weight (or whole heads / rows of it) summed into
    that projection's units: q and o per query head, k and v per KV head, gate and up per row, down per column (a
    channel). ``dtype``: the sums' dtype (default ``t``'s)."""
    d = layer.head_dim
    if role in ("q", "k", "v"):
        return t.view(-1, d, t.shape[-1]).sum((1, 2), dtype=dtype)
    if role == "o":
        return t.view(t.shape[0], layer.num_heads, d).sum((0, 2), dtype=dtype)
    return t.sum(0 if role == "down" else 1, dtype=dtype)


def combine_unit_sums(layer, sums: dict[str, torch.Tensor]):
    """(groups, heads, channels) from the per-projection ``unit_sums``."""
    groups = heads = channels = None
    if layer.has_attention:
        h, kv = layer.num_heads, layer.num_kv_heads
        heads = sums["q"] + sums["o"]
        kv_part = sums["k"] + sums["v"]
        groups = heads.view(kv, h // kv).sum(1) + kv_part
    if layer.has_mlp:
        channels = sums["gate"] + sums["up"] + sums["down"]
    return groups, heads, channels


def reduce_weights(layer, **tensors):
    """Sum per-element tensors shaped like the projection weights (``q=..., down=...``) into (groups, heads,
    channels)."""
    return combine_unit_sums(layer, {r: unit_sums(layer, r, t) for r, t in tensors.items() if t is not None})


CHUNK_ELEMENTS = 2**19  # elements of a per-weight temporary at a time (4 MiB in float64)


def row_chunks(n_rows: int, n_cols: int, multiple: int = 1, elements: int | None = None) -> list[slice]:
    """Slices of a weight's rows, each about ``elements`` (default ``CHUNK_ELEMENTS``) elements and a multiple of
    ``multiple`` rows."""
    step = max(multiple, (elements or CHUNK_ELEMENTS) // max(n_cols, 1) // multiple * multiple)
    return [slice(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def chunked_unit_sums(layer, role: str, shape, part, dtype=None) -> torch.Tensor:
    """``unit_sums`` of the per-element tensor of a projection weight of ``shape`` that ``part(rows)`` gives for
    a slice of its rows, computed one chunk of rows (whole heads) at a time, so the per-element tensor never
    exists whole: heads and rows of q/k/v/gate/up are concatenated, the column sums of o/down added up.
    ``dtype``: the sums' dtype (default the parts'). The same sums as ``unit_sums`` up to float rounding."""
    pieces, total = [], None
    for rows in row_chunks(shape[0], shape[1], layer.head_dim):
        s = unit_sums(layer, role, part(rows), dtype)
        if role in ("o", "down"):  # sums over rows: add the chunks up
            total = s if total is None else total + s
        else:  # one sum per head / row: the chunks' sums follow one another
            pieces.append(s)
    return torch.cat(pieces) if pieces else total


def column_sums(weight: torch.Tensor, fn) -> torch.Tensor:
    """sum over rows of ``fn(weight[rows])`` (float64 per-element terms of a weight, e.g. its squares), one
    chunk of rows at a time."""
    total = None
    for rows in row_chunks(weight.shape[0], weight.shape[1]):
        s = fn(weight[rows].detach()).sum(0)
        total = s if total is None else total + s
    return total


def reduce_per_projection(layer, elementwise):
    """``reduce_weights`` of ``elementwise(role, linear, rows)`` (the per-element terms of rows ``rows`` of the
    projection's weight, typically a float64 copy worked on in place) for every projection of the layer,
    computed one projection and one chunk of its rows at a time (``chunked_unit_sums``), so only a few MiB of
    such terms exist at once; the same sums as building them all first, up to float rounding."""
    projections = {}
    if layer.has_attention:
        projections.update(layer.attention_projections()._asdict())
    if layer.has_mlp:
        projections.update(layer.mlp_projections()._asdict())
    sums = {role: chunked_unit_sums(layer, role, lin.weight.shape, lambda rows, r=role, m=lin: elementwise(r, m, rows))
            for role, lin in projections.items()}
    return combine_unit_sums(layer, sums)


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
    """OWL's layer outlier ratio: the share of Wanda scores |W_ij| * ||X_j|| above m times their layer mean.
    Two passes over the projections (the sum, then the count above the threshold), each holding one chunk of
    rows' float64 scores at a time (``row_chunks``)."""
    pairs = []
    if layer.has_attention:
        a = layer.attention_projections()
        pairs += [(a.q, stats.attn_x), (a.k, stats.attn_x), (a.v, stats.attn_x), (a.o, stats.attn_in)]
    if layer.has_mlp:
        mp = layer.mlp_projections()
        pairs += [(mp.gate, stats.mlp_x), (mp.up, stats.mlp_x), (mp.down, stats.mlp_in)]
    if not pairs:
        return 0.0

    def wanda_chunks(lin, s):  # float64 Wanda scores of one chunk of rows at a time
        norm = s.sumsq.sqrt()[None, :]
        for rows in row_chunks(*lin.weight.shape):
            yield lin.weight[rows].detach().abs().double() * norm

    total = sum(x.sum() for lin, s in pairs for x in wanda_chunks(lin, s))
    count = sum(lin.weight.numel() for lin, _ in pairs)
    mean = total / count
    return float(sum((x > m * mean).sum() for lin, s in pairs for x in wanda_chunks(lin, s)) / count)
