"""The adapter for Hugging Face decoder-only LMs laid out as ``model.layers[i].{self_attn, mlp, norms}``, driven by
the family table (``families.py``): module paths, fused projections and config quirks come from the table, so a
family file only names its table row and overrides what the table cannot say.

Fused tensors (Phi-3's ``qkv_proj``, ``gate_up_proj``) are handed out as :class:`FusedRows` views and fused again
when surgery installs smaller projections. It does not score, allocate or choose units.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.adapters.base import (
    AttentionProjections,
    FusedRows,
    LayerAdapter,
    LayerNorms,
    MlpProjections,
    ModelAdapter,
    is_uniform,
)
from edgeprune.adapters.families import LAYER_KEYS, LAYER_PREFIX, role_rows
from edgeprune.models import remote_code


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0]


def fuse_rows(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose rows are ``parts``' rows in order (a missing bias counts as zeros)."""
    first = parts[0]
    has_bias = any(p.bias is not None for p in parts)
    out = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=has_bias,
                    device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([p.weight for p in parts], 0))
        if has_bias:
            out.bias.copy_(torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                                      for p in parts]))
    return out


class DecoderLayerAdapter(LayerAdapter):
    """A decoder layer whose module paths the family table gives."""

    def _path(self, role: str) -> str:
        return self.family.layer_module_path(role)

    def _get(self, role: str) -> nn.Module:
        return self.layer.get_submodule(self._path(role))

    def _set(self, path: str, module: nn.Module) -> None:
        remote_code.set_module(self.layer, path, module)

    @property
    def attention(self) -> nn.Module:
        return self.layer.get_submodule(_parent(self._path("o")))

    @property
    def mlp(self) -> nn.Module:
        return self.layer.get_submodule(_parent(self._path("down")))

    def _fused_heads(self) -> tuple[int, int]:
        """(query heads, KV heads) of a fused qkv tensor: the HF module reads them from its (per-layer) config."""
        cfg = self.attention.config
        return cfg.num_attention_heads, cfg.num_key_value_heads

    def _projection(self, role: str):
        lin = self._get(role)
        members = self.family.fused_members(role)
        if len(members) == 1:
            return lin
        heads, kv = self._fused_heads() if "q" in members else (0, 0)
        inter = lin.out_features // 2 if "gate" in members else 0
        rows = role_rows(self.family, role, heads, kv, self.head_dim, inter)
        return FusedRows(lin, rows.start, rows.stop, role)

    def attention_projections(self) -> AttentionProjections:
        return AttentionProjections(*(self._projection(r) for r in ("q", "k", "v", "o")))

    def mlp_projections(self) -> MlpProjections:
        return MlpProjections(*(self._projection(r) for r in ("gate", "up", "down")))

    def norms(self) -> LayerNorms:
        fam = self.family

        def get(role):
            if not fam.has_role(role):
                return None
            try:
                return self._get(role)
            except AttributeError:  # q/k norms of a removed attention block
                return None

        return LayerNorms(get("attn_norm"), get("mlp_norm"), get("attn_post_norm"), get("mlp_post_norm"),
                          get("q_norm"), get("k_norm"))

    def _install(self, parts: dict[str, nn.Linear]) -> None:
        """Put the given role Linears in place, fusing the roles that share a tensor."""
        done = set()
        for role, lin in parts.items():
            if role in done:
                continue
            members = self.family.fused_members(role)
            if len(members) == 1:
                self._set(self._path(role), lin)
            else:
                self._set(self._path(role), fuse_rows([parts[m] for m in members]))
            done.update(members)

    def replace_attention(self, q, k, v, o) -> None:
        self._install({"q": q, "k": k, "v": v, "o": o})
        remote_code.set_attention_widths(self.attention, q.out_features // self.head_dim,
                                         k.out_features // self.head_dim,
                                         self.family.attention_reads_config_heads)

    def remove_attention(self, out_bias=None) -> None:
        hidden = self.attention_input_norm.weight.shape[0]
        stub = remote_code.PrunedAttention(self.index, self.head_dim, hidden, bias=out_bias is not None)
        if out_bias is not None:
            stub.bias.data.copy_(out_bias)
        self._set(_parent(self._path("o")), stub)

    def replace_mlp(self, gate, up, down) -> None:
        self._install({"gate": gate, "up": up, "down": down})
        if hasattr(self.mlp, "intermediate_size"):
            self.mlp.intermediate_size = gate.out_features

    def remove_mlp(self, out_bias=None) -> None:
        hidden = self.attention_input_norm.weight.shape[0]
        stub = remote_code.PrunedMLP(hidden, bias=out_bias is not None)
        if out_bias is not None:
            stub.bias.data.copy_(out_bias)
        self._set(_parent(self._path("down")), stub)


class DecoderAdapter(ModelAdapter):
    """A causal LM with ``model.embed_tokens``, ``model.layers``, ``model.norm`` and ``lm_head`` (from the table)."""

    layer_adapter_cls = DecoderLayerAdapter
    # config lists indexed by layer that must follow layer drops
    per_layer_config_lists: tuple[str, ...] = ("layer_types",)

    def _module(self, role: str) -> nn.Module:
        return self.model.get_submodule(self.spec.module_path(role))

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_submodule(LAYER_PREFIX.split(".")[0])

    @property
    def _layer_list(self) -> nn.ModuleList:
        return self.model.get_submodule(LAYER_PREFIX.rsplit(".", 2)[0])

    @property
    def layers(self) -> list[LayerAdapter]:
        spec = self.spec
        return [self.layer_adapter_cls(layer, i, self.head_dim, spec) for i, layer in enumerate(self._layer_list)]

    @property
    def embed_tokens(self) -> nn.Module:
        return self._module("embed")

    @property
    def lm_head(self) -> nn.Module:
        return self._module("lm_head")

    @property
    def final_norm(self) -> nn.Module:
        return self._module("final_norm")

    def drop_layers(self, indices: list[int]) -> None:
        drop = set(indices)
        old = self._layer_list
        keep = [i for i in range(len(old)) if i not in drop]
        new = nn.ModuleList([old[i] for i in keep])
        remote_code.set_module(self.model, LAYER_PREFIX.rsplit(".", 2)[0], new)
        for new_idx, layer in enumerate(new):
            # the KV cache is indexed by layer_idx
            for mod in (layer, *layer.children()):
                if hasattr(mod, "layer_idx"):
                    mod.layer_idx = new_idx
        cfg = self.config
        for name in self.per_layer_config_lists + LAYER_KEYS:
            values = getattr(cfg, name, None)
            if isinstance(values, list) and len(values) == len(old):
                setattr(cfg, name, [values[i] for i in keep])
        cfg.num_hidden_layers = len(keep)
        self.sync_config()

    def sync_config(self) -> None:
        """Record per-layer widths in the config; scalar fields follow when every layer agrees."""
        cfg = self.config
        layers = self.layers
        shapes = [layer.shape for layer in layers]
        biases = [layer.biases for layer in layers]
        cfg.num_hidden_layers = len(shapes)
        cfg.layer_num_heads = [s.num_heads for s in shapes]
        cfg.layer_num_kv_heads = [s.num_kv_heads for s in shapes]
        cfg.layer_intermediate_size = [s.intermediate_size for s in shapes]
        cfg.layer_attention_out_bias = [b.o for b in biases]
        cfg.layer_mlp_out_bias = [b.down for b in biases]
        if is_uniform(shapes) and shapes:
            cfg.num_attention_heads = shapes[0].num_heads
            cfg.num_key_value_heads = shapes[0].num_kv_heads
            cfg.intermediate_size = shapes[0].intermediate_size
        cfg.head_dim = self.head_dim

