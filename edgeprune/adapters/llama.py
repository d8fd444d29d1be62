"""Adapters for the Llama family with grouped-query attention: Llama (SmolLM2), Mistral, Qwen2.

They share module names (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input/post_attention norms);
Qwen2 adds q/k/v biases and Mistral/Qwen2 may use sliding-window attention, which pruning leaves alone.
"""

from __future__ import annotations

from torch import nn

from edgeprune.adapters.base import LayerAdapter, LayerShape, ModelAdapter
from edgeprune.models import remote_code


class LlamaLayerAdapter(LayerAdapter):
    @property
    def attention(self) -> nn.Module:
        return self.layer.self_attn

    @property
    def mlp(self) -> nn.Module:
        return self.layer.mlp

    def attention_projections(self):
        a = self.layer.self_attn
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj

    def mlp_projections(self):
        m = self.layer.mlp
        return m.gate_proj, m.up_proj, m.down_proj

    @property
    def attention_input_norm(self) -> nn.Module:
        return self.layer.input_layernorm

    @property
    def mlp_input_norm(self) -> nn.Module:
        return self.layer.post_attention_layernorm

    def replace_attention(self, q, k, v, o) -> None:
        a = self.layer.self_attn
        a.q_proj, a.k_proj, a.v_proj, a.o_proj = q, k, v, o
        a.num_key_value_groups = q.out_features // k.out_features

    def remove_attention(self, out_bias=None) -> None:
        hidden = self.layer.input_layernorm.weight.shape[0]
        stub = remote_code.PrunedAttention(self.index, self.head_dim, hidden, bias=out_bias is not None)
        if out_bias is not None:
            stub.bias.data.copy_(out_bias)
        self.layer.self_attn = stub

    def replace_mlp(self, gate, up, down) -> None:
        m = self.layer.mlp
        m.gate_proj, m.up_proj, m.down_proj = gate, up, down
        if hasattr(m, "intermediate_size"):
            m.intermediate_size = gate.out_features

    def remove_mlp(self, out_bias=None) -> None:
        hidden = self.layer.input_layernorm.weight.shape[0]
        stub = remote_code.PrunedMLP(hidden, bias=out_bias is not None)
        if out_bias is not None:
            stub.bias.data.copy_(out_bias)
        self.layer.mlp = stub


class LlamaAdapter(ModelAdapter):
    family = "llama"
    model_types = ("llama",)
    layer_adapter_cls = LlamaLayerAdapter
    # config lists indexed by layer that must follow layer drops
    per_layer_config_lists: tuple[str, ...] = ("layer_types",)

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> list[LayerAdapter]:
        return [self.layer_adapter_cls(layer, i, self.head_dim) for i, layer in enumerate(self.model.model.layers)]

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.model.embed_tokens

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def drop_layers(self, indices: list[int]) -> None:
        drop = set(indices)
        keep = [i for i in range(len(self.model.model.layers)) if i not in drop]
        self.model.model.layers = nn.ModuleList([self.model.model.layers[i] for i in keep])
        for new_idx, layer in enumerate(self.model.model.layers):
            # the KV cache is indexed by layer_idx
            for mod in (layer, layer.self_attn):
                if hasattr(mod, "layer_idx"):
                    mod.layer_idx = new_idx
        cfg = self.config
        for name in self.per_layer_config_lists + ("layer_num_heads", "layer_num_kv_heads",
                                                   "layer_intermediate_size", "layer_attention_out_bias",
                                                   "layer_mlp_out_bias"):
            values = getattr(cfg, name, None)
            if isinstance(values, list) and len(values) == len(keep) + len(drop):
                setattr(cfg, name, [values[i] for i in keep])
        cfg.num_hidden_layers = len(keep)
        self.sync_config()

    def sync_config(self) -> None:
        """Record per-layer widths in the config; scalar fields follow when every layer agrees."""
        cfg = self.config
        shapes = self.shapes()
        layers = self.layers
        cfg.num_hidden_layers = len(shapes)
        cfg.layer_num_heads = [s.num_heads for s in shapes]
        cfg.layer_num_kv_heads = [s.num_kv_heads for s in shapes]
        cfg.layer_intermediate_size = [s.intermediate_size for s in shapes]
        cfg.layer_attention_out_bias = [_out_bias(layer.attention, "o_proj") for layer in layers]
        cfg.layer_mlp_out_bias = [_out_bias(layer.mlp, "down_proj") for layer in layers]
        if is_uniform(shapes) and shapes:
            cfg.num_attention_heads = shapes[0].num_heads
            cfg.num_key_value_heads = shapes[0].num_kv_heads
            cfg.intermediate_size = shapes[0].intermediate_size
        cfg.head_dim = self.head_dim


def _out_bias(module: nn.Module, proj: str) -> bool:
    lin = getattr(module, proj, None)
    if lin is not None:
        return lin.bias is not None
    return getattr(module, "bias", None) is not None


def is_uniform(shapes: list[LayerShape]) -> bool:
    return len({(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes}) <= 1 and all(
        s.num_heads > 0 and s.intermediate_size > 0 for s in shapes
    )


class MistralAdapter(LlamaAdapter):
    family = "mistral"
    model_types = ("mistral",)


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    model_types = ("qwen2",)
