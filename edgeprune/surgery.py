"""Structural surgery: cut a PruningPlan into the model. Linear layers become physically smaller (rows and
columns are removed, biases too); removed blocks become parameter-free stubs; removed layers leave the stack."""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.plan import PruningPlan


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, idx.numel(), bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    idx = idx.to(lin.weight.device)
    new.weight.data.copy_(lin.weight.data.index_select(0, idx))
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data.index_select(0, idx))
    return new


def _cols(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(idx.numel(), lin.out_features, bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    new.weight.data.copy_(lin.weight.data.index_select(1, idx.to(lin.weight.device)))
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data)
    return new


def unit_dims(units: list[int], size: int) -> torch.Tensor:
    """Row/column indices of the kept heads (each head spans ``size`` consecutive features)."""
    return torch.tensor([u * size + i for u in units for i in range(size)], dtype=torch.long)


def apply_plan(adapter, plan: PruningPlan, attention_bias: dict | None = None,
               mlp_bias: dict | None = None) -> None:
    """Prune ``adapter.model`` in place. Optional per-layer bias vectors (bias compensation) are added to the
    output projections of the pruned blocks."""
    from edgeprune.heap import release_file_pages, storage_ranges

    plan.validate(adapter)
    attention_bias, mlp_bias = attention_bias or {}, mlp_bias or {}
    with torch.no_grad():
        for layer, lp in zip(adapter.layers, plan.layers, strict=True):
            if lp.drop:
                continue
            old = storage_ranges(layer.layer)
            cut_attention(layer, lp, attention_bias.get(lp.index))
            cut_mlp(layer, lp, mlp_bias.get(lp.index))
            release_file_pages(old, storage_ranges(adapter.model))  # the cut weights' mapped checkpoint pages
    drop_layers(adapter, [lp.index for lp in plan.layers if lp.drop])
    adapter.sync_config()


def drop_layers(adapter, drops: list[int]) -> None:
    """``adapter.drop_layers`` that also releases the dropped layers' mapped checkpoint pages."""
    from edgeprune.heap import release_file_pages, storage_ranges

    if not drops:
        return
    old = [r for i in drops for r in storage_ranges(adapter.layers[i].layer)]
    adapter.drop_layers(drops)
    release_file_pages(old, storage_ranges(adapter.model))


def cut_attention(layer, lp, bias: torch.Tensor | None = None) -> bool:
    """Cut one layer's attention block to the plan's kept heads (adding ``bias`` to the output projection).
    Returns whether anything changed."""
    if not layer.has_attention:
        return False
    if not lp.kv_heads:
        ref = layer.attention_projections().q.weight
        layer.remove_attention(out_bias=bias)
        layer.attention.to(device=ref.device, dtype=ref.dtype)  # the stub is built in float32 on the CPU
        return True
    if lp.heads == list(range(layer.num_heads)) and bias is None:
        return False
    with torch.no_grad():
        a = layer.attention_projections()
        hd = layer.head_dim
        qi, kvi = unit_dims(lp.heads, hd), unit_dims(lp.kv_heads, hd)
        layer.replace_attention(_rows(a.q, qi), _rows(a.k, kvi), _rows(a.v, kvi), _with_bias(_cols(a.o, qi), bias))
    return True


def cut_mlp(layer, lp, bias: torch.Tensor | None = None) -> bool:
    """Cut one layer's MLP block to the plan's kept channels (adding ``bias`` to the down projection)."""
    if not layer.has_mlp:
        return False
    if not lp.channels:
        ref = layer.mlp_projections().gate.weight
        layer.remove_mlp(out_bias=bias)
        layer.mlp.to(device=ref.device, dtype=ref.dtype)
        return True
    if lp.channels == list(range(layer.intermediate_size)) and bias is None:
        return False
    with torch.no_grad():
        m = layer.mlp_projections()
        ci = torch.tensor(lp.channels, dtype=torch.long)
        layer.replace_mlp(_rows(m.gate, ci), _rows(m.up, ci), _with_bias(_cols(m.down, ci), bias))
    return True


def _with_bias(lin: nn.Linear, extra: torch.Tensor | None) -> nn.Linear:
    if extra is None:
        return lin
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    lin.bias.data += extra.to(lin.bias.device, lin.bias.dtype)
    return lin


def mask_plan(adapter, plan: PruningPlan) -> None:
    """Zero (instead of removing) the weights of every unit the plan removes: the reference that surgery
    must match exactly. Whole dropped layers cannot be masked and are not allowed here."""
    plan.validate(adapter)
    with torch.no_grad():
        for layer, lp in zip(adapter.layers, plan.layers, strict=True):
            if lp.drop:
                raise ValueError("mask_plan does not support dropped layers")
            if layer.has_attention:
                a = layer.attention_projections()
                hd = layer.head_dim
                gone_h = unit_dims([h for h in range(layer.num_heads) if h not in lp.heads], hd)
                gone_kv = unit_dims([h for h in range(layer.num_kv_heads) if h not in lp.kv_heads], hd)
                for lin, idx in ((a.q, gone_h), (a.k, gone_kv), (a.v, gone_kv)):
                    lin.weight[idx] = 0
                    if lin.bias is not None:
                        lin.bias[idx] = 0
                a.o.weight[:, gone_h] = 0
            if layer.has_mlp:
                m = layer.mlp_projections()
                gone = torch.tensor([c for c in range(layer.intermediate_size) if c not in set(lp.channels)],
                                    dtype=torch.long)
                m.gate.weight[gone] = 0
                m.up.weight[gone] = 0
                m.down.weight[:, gone] = 0
