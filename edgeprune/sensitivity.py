"""Layer sensitivity, per decoder layer and module (attention / MLP): how much the model suffers when that module
loses units. LSPS prunes sensitive modules less.

Measures (``--sensitivity``):
- ``loss``: the calibration-loss increase (negative if the probe happens to help) when only this module is pruned at a probe ratio (its lowest-scored
  units masked), divided by the parameters the probe removed: the marginal loss per removed parameter.
- ``bi``: Block Influence (ShortGPT), 1 - mean cos(input, output) of the block on calibration tokens.
- ``fisher``: the first-order (Taylor) estimate of removing the probe's units, sum of |w * dL/dw| over them,
  per removed parameter; it needs only the gradients the PIEM/Taylor scorers already compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from edgeprune.errors import EdgePruneError


@dataclass
class LayerSensitivity:
    index: int
    attention: float
    mlp: float

    def to_dict(self) -> dict:
        return asdict(self)


def _loss(model, batches: torch.Tensor) -> float:
    from edgeprune.models.placement import input_device

    batches = batches.to(input_device(model))
    with torch.no_grad():
        logits = model(input_ids=batches, use_cache=False).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batches[:, 1:].reshape(-1)).item()


def _probe_units(layer, s, probe_ratio: float, attn_unit: str):
    """The lowest-scored units a probe removes: (query heads, kv heads, channels) and the parameters they hold."""
    from edgeprune.allocation.base import unit_costs_layer

    cost = unit_costs_layer(layer, attn_unit)
    heads, kv, ch = [], [], []
    if layer.has_attention:
        g = layer.group_size
        if attn_unit == "group":
            n = max(1, int(round(probe_ratio * layer.num_kv_heads)))
            n = min(n, layer.num_kv_heads)
            kv = sorted(torch.argsort(s.groups)[:n].tolist())
            heads = [h for h in range(layer.num_heads) if h // g in kv]
            attn_params = n * cost.attn_unit_params
        else:
            n = min(max(1, int(round(probe_ratio * g))), g)
            for k in range(layer.num_kv_heads):
                local = torch.argsort(s.heads[k * g:(k + 1) * g])[:n].tolist()
                heads += [k * g + i for i in local]
            attn_params = n * cost.attn_unit_params
    else:
        attn_params = 0
    if layer.has_mlp:
        n = max(1, int(round(probe_ratio * layer.intermediate_size)))
        ch = sorted(torch.argsort(s.channels)[:n].tolist())
    return heads, kv, ch, attn_params, len(ch) * cost.channel_params


class _Masked:
    """Temporarily zero some units' weights (restored on exit)."""

    def __init__(self, tensors_and_index):
        self.items = [(t, dim, idx.to(t.device)) for t, dim, idx in tensors_and_index]

    def __enter__(self):
        self.saved = []
        for t, dim, idx in self.items:
            self.saved.append(t.index_select(dim, idx).clone())
            t.index_fill_(dim, idx, 0)

    def __exit__(self, *exc):
        for (t, dim, idx), old in zip(self.items, self.saved, strict=True):
            t.index_copy_(dim, idx, old)


def _rows(units, size):
    return torch.tensor([u * size + i for u in units for i in range(size)], dtype=torch.long)


class Sensitivity:
    """One way to measure layer sensitivity. Capability flags say what ``measure`` reads, so the driver computes
    only that: block statistics (an activation pass) or the gradients the scorer's backward pass produced."""

    name: ClassVar[str] = ""
    needs_block_stats: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False

    def measure(self, adapter, scores, batches, probe_ratio, attn_unit, grads, progress) -> list[LayerSensitivity]:
        raise NotImplementedError


class LossProbe(Sensitivity):
    name = "loss"

    def measure(self, adapter, scores, batches, probe_ratio, attn_unit, grads, progress):
        return _loss_probe(adapter, scores, batches, probe_ratio, attn_unit, progress)


class BlockInfluence(Sensitivity):
    name = "bi"
    needs_block_stats = True

    def measure(self, adapter, scores, batches, probe_ratio, attn_unit, grads, progress):
        out = []
        for layer, s in zip(adapter.layers, scores.layers, strict=True):
            if not s.blocks:
                raise EdgePruneError("the bi sensitivity needs a scorer that reads activations")
            out.append(LayerSensitivity(layer.index, s.blocks["attention"], s.blocks["mlp"]))
        return out


class FisherProbe(Sensitivity):
    name = "fisher"
    needs_gradients = True

    def measure(self, adapter, scores, batches, probe_ratio, attn_unit, grads, progress):
        return _fisher(adapter, scores, probe_ratio, attn_unit, grads)


SENSITIVITIES: dict[str, type[Sensitivity]] = {c.name: c for c in (LossProbe, BlockInfluence, FisherProbe)}


def measure(name: str, adapter, scores, batches: torch.Tensor, probe_ratio: float = 0.3,
            attn_unit: str = "group", grads: dict | None = None, progress: bool = True) -> list[LayerSensitivity]:
    if name not in SENSITIVITIES:
        raise EdgePruneError(f"unknown sensitivity '{name}'; choose from {', '.join(SENSITIVITIES)}")
    return SENSITIVITIES[name]().measure(adapter, scores, batches, probe_ratio, attn_unit, grads, progress)


def _loss_probe(adapter, scores, batches, probe_ratio, attn_unit, progress) -> list[LayerSensitivity]:
    from tqdm.auto import tqdm

    base = _loss(adapter.model, batches)
    out = []
    with torch.no_grad():
        for layer, s in tqdm(list(zip(adapter.layers, scores.layers, strict=True)), desc="sensitivity",
                             unit="layer", disable=not progress, leave=False):
            heads, kv, ch, a_params, m_params = _probe_units(layer, s, probe_ratio, attn_unit)
            sens = {"attention": 0.0, "mlp": 0.0}
            if layer.has_attention and heads:
                a = layer.attention_projections()
                d = layer.head_dim
                items = [(a.q.weight, 0, _rows(heads, d)), (a.o.weight, 1, _rows(heads, d))]
                if kv:
                    items += [(a.k.weight, 0, _rows(kv, d)), (a.v.weight, 0, _rows(kv, d))]
                with _Masked(items):
                    sens["attention"] = (_loss(adapter.model, batches) - base) / max(a_params, 1)
            if layer.has_mlp and ch:
                m = layer.mlp_projections()
                idx = torch.tensor(ch, dtype=torch.long)
                with _Masked([(m.gate.weight, 0, idx), (m.up.weight, 0, idx), (m.down.weight, 1, idx)]):
                    sens["mlp"] = (_loss(adapter.model, batches) - base) / max(m_params, 1)
            out.append(LayerSensitivity(layer.index, sens["attention"], sens["mlp"]))
    return out


def _fisher(adapter, scores, probe_ratio, attn_unit, grads) -> list[LayerSensitivity]:
    if grads is None:
        raise EdgePruneError("the fisher sensitivity needs gradients (use --scorer piem or taylor)")
    from edgeprune.scoring.scorers import TaylorScorer

    out = []
    for layer, s in zip(adapter.layers, scores.layers, strict=True):
        t = TaylorScorer().score_layer(layer, None, grads)
        heads, kv, ch, a_params, m_params = _probe_units(layer, s, probe_ratio, attn_unit)
        att = 0.0
        if layer.has_attention and heads:
            att = float(t.groups[kv].sum()) if kv else float(t.heads[heads].sum())
        mlp = float(t.channels[ch].sum()) if ch else 0.0
        out.append(LayerSensitivity(layer.index, att / max(a_params, 1), mlp / max(m_params, 1)))
    return out
