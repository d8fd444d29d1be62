# Modeling code for edgeprune checkpoints whose decoder layers have different widths.
#
# This file is copied verbatim into every such checkpoint directory (as modeling_edgeprune.py) so that plain
# transformers loads it with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. It depends on
# torch and transformers only, and edgeprune imports the same file, so there is one definition of the format.
#
# Format: the base family's config plus three per-layer lists. A layer with 0 heads has no attention block,
# a layer with intermediate size 0 has no MLP block; the residual stream passes through unchanged there.
import importlib

import torch
from torch import nn

FAMILY = "llama"  # rewritten when the file is written into a checkpoint

_CLASS_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


class PrunedAttention(nn.Module):
    """An attention block with every head removed: adds nothing (or a constant bias) to the residual.

    It still appends zero-head keys/values to the KV cache so that the cache's sequence length, which
    generation reads from layer 0, stays right.
    """

    def __init__(self, layer_idx: int, head_dim: int, hidden_size: int, bias: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        b, s, _ = hidden_states.shape
        if cache is not None:
            empty = hidden_states.new_zeros(b, 0, s, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        if self.bias is not None:
            out = out + self.bias
        return out, None


class PrunedMLP(nn.Module):
    """An MLP block with every channel removed: adds nothing (or a constant bias) to the residual."""

    def __init__(self, hidden_size: int, bias: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x):
        out = torch.zeros_like(x)
        return out + self.bias if self.bias is not None else out


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool | None = None) -> nn.Linear:
    bias = old.bias is not None if bias is None else bias
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def reshape_layers(model, config) -> None:
    """Give each decoder layer of a freshly built model the widths the config lists for it."""
    heads = getattr(config, "layer_num_heads", None)
    kv_heads = getattr(config, "layer_num_kv_heads", None)
    inter = getattr(config, "layer_intermediate_size", None)
    attn_bias = list(getattr(config, "layer_attention_out_bias", None) or [])
    mlp_bias = list(getattr(config, "layer_mlp_out_bias", None) or [])
    head_dim = config.head_dim
    hidden = config.hidden_size
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        o_bias = bool(attn_bias[i]) if attn_bias else None
        d_bias = bool(mlp_bias[i]) if mlp_bias else None
        if heads is not None:
            h, kv = heads[i], kv_heads[i]
            if h == 0:
                layer.self_attn = PrunedAttention(i, head_dim, hidden, bias=bool(o_bias))
            else:
                attn.q_proj = _linear_like(attn.q_proj, hidden, h * head_dim)
                attn.k_proj = _linear_like(attn.k_proj, hidden, kv * head_dim)
                attn.v_proj = _linear_like(attn.v_proj, hidden, kv * head_dim)
                attn.o_proj = _linear_like(attn.o_proj, h * head_dim, hidden, o_bias)
                attn.num_key_value_groups = h // kv
        if inter is not None:
            n = inter[i]
            if n == 0:
                layer.mlp = PrunedMLP(hidden, bias=bool(d_bias))
            else:
                mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, n)
                mlp.up_proj = _linear_like(mlp.up_proj, hidden, n)
                mlp.down_proj = _linear_like(mlp.down_proj, n, hidden, d_bias)
                if hasattr(mlp, "intermediate_size"):
                    mlp.intermediate_size = n


def make_classes(family: str):
    """The (config, causal-LM) classes for one base family."""
    name = _CLASS_NAMES[family]
    cfg_mod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    mdl_mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    base_config = getattr(cfg_mod, f"{name}Config")
    base_model = getattr(mdl_mod, f"{name}ForCausalLM")

    class Config(base_config):
        model_type = f"edgeprune_{family}"

        def validate_architecture(self):
            # head_dim is explicit and layers carry their own head counts, so hidden_size need not divide.
            pass

    class ForCausalLM(base_model):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            reshape_layers(self, config)

    Config.__name__ = Config.__qualname__ = "EdgePruneConfig"
    ForCausalLM.__name__ = ForCausalLM.__qualname__ = "EdgePruneForCausalLM"
    return Config, ForCausalLM


EdgePruneConfig, EdgePruneForCausalLM = make_classes(FAMILY)
