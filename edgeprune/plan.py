"""The PruningPlan: plain, JSON-serialisable data saying which units of each layer stay.

Scoring and allocation produce it, surgery consumes it, checkpoints store it. Indices refer to the model the
plan is applied to (``compose`` maps a later round's plan back to the original model's indices).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgeprune.errors import EdgePruneError


@dataclass
class LayerPlan:
    index: int
    heads: list[int]  # kept query heads, sorted
    kv_heads: list[int]  # kept KV heads, sorted; empty with heads empty = attention block removed
    channels: list[int]  # kept MLP channels, sorted; empty = MLP block removed
    drop: bool = False  # the whole decoder layer is removed

    @property
    def num_heads(self) -> int:
        return 0 if self.drop else len(self.heads)

    @property
    def num_kv_heads(self) -> int:
        return 0 if self.drop else len(self.kv_heads)

    @property
    def intermediate_size(self) -> int:
        return 0 if self.drop else len(self.channels)


@dataclass
class PruningPlan:
    layers: list[LayerPlan]
    meta: dict = field(default_factory=dict)

    @classmethod
    def identity(cls, adapter) -> PruningPlan:
        return cls([LayerPlan(layer.index, list(range(layer.num_heads)), list(range(layer.num_kv_heads)),
                              list(range(layer.intermediate_size))) for layer in adapter.layers])

    def to_dict(self) -> dict:
        return {"meta": self.meta, "layers": [asdict(lp) for lp in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> PruningPlan:
        return cls([LayerPlan(**lp) for lp in d["layers"]], d.get("meta", {}))

    def validate(self, adapter) -> None:
        """Raise EdgePruneError unless the plan is legal for this model (GQA groups stay equal-sized)."""
        layers = adapter.layers
        if len(self.layers) != len(layers):
            raise EdgePruneError(f"plan has {len(self.layers)} layers, the model {len(layers)}")
        if all(lp.drop for lp in self.layers):
            raise EdgePruneError("the plan removes every decoder layer")
        for lp, layer in zip(self.layers, layers, strict=True):
            if lp.drop:
                continue
            g = layer.group_size
            _check_indices(lp.heads, layer.num_heads, f"layer {lp.index} heads")
            _check_indices(lp.kv_heads, layer.num_kv_heads, f"layer {lp.index} kv_heads")
            _check_indices(lp.channels, layer.intermediate_size, f"layer {lp.index} channels")
            if bool(lp.heads) != bool(lp.kv_heads):
                raise EdgePruneError(f"layer {lp.index}: query heads and KV heads must be kept or removed together")
            if lp.kv_heads:
                per_group = [sum(1 for h in lp.heads if h // g == k) for k in lp.kv_heads]
                if len(set(per_group)) != 1 or sum(per_group) != len(lp.heads):
                    raise EdgePruneError(
                        f"layer {lp.index}: every kept KV group must keep the same number of query heads "
                        f"and every kept query head needs its KV head")


def _check_indices(idx: list[int], n: int, what: str) -> None:
    if any(i < 0 or i >= n for i in idx) or len(set(idx)) != len(idx) or idx != sorted(idx):
        raise EdgePruneError(f"{what}: indices must be sorted, unique and below {n}")


def compose(first: PruningPlan, second: PruningPlan) -> PruningPlan:
    """The plan equal to applying ``first`` and then ``second`` (whose indices refer to first's result)."""
    out = []
    kept = [lp for lp in first.layers if not lp.drop]
    if len(kept) != len(second.layers):
        raise EdgePruneError("cannot compose plans: layer counts differ")
    it = iter(second.layers)
    for lp in first.layers:
        if lp.drop:
            out.append(lp)
            continue
        s = next(it)
        out.append(LayerPlan(lp.index, [lp.heads[i] for i in s.heads], [lp.kv_heads[i] for i in s.kv_heads],
                             [lp.channels[i] for i in s.channels], s.drop))
    return PruningPlan(out, {**first.meta, **second.meta})
