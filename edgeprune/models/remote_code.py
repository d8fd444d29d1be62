# Modeling code for edgeprune checkpoints whose decoder layers have different widths.
#
# This file is copied verbatim into every such checkpoint directory (as modeling_edgeprune.py) so that plain
# transformers loads it with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. It depends on
# torch and transformers only, and edgeprune imports the same file, so there is one definition of the format.
#
# Format: the base family's config plus per-layer lists (LAYER_KEYS). A layer with 0 heads has no attention
# block, a layer with intermediate size 0 has no MLP block; the residual stream passes through unchanged there.
# Family-generic: LAYOUT (written from edgeprune/adapters/families.py, `remote_layout`) says which transformers
# classes to build and where each projection lives in a decoder layer, and which projections share a fused
# tensor (rows in the listed order).
import copy
import importlib

import torch
from torch import nn

FAMILY = "llama"  # FAMILY and LAYOUT are rewritten when the file is written into a checkpoint
LAYOUT = {"family": "llama", "hf_module": "llama", "config_class": "LlamaConfig", "causal_lm_class": "LlamaForCausalLM", "layers": "model.layers", "paths": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}, "fused": {}, "attention_reads_config_heads": False}  # noqa: E501
LAYER_KEYS = ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size", "layer_attention_out_bias",
              "layer_mlp_out_bias")


class PrunedAttention(nn.Module):
    """An attention block with every head removed: adds nothing (or a constant bias) to the residual.

    It still appends zero-head keys/values to the KV cache so that the cache's sequence length, which
    generation reads from layer 0, stays right.
    """

    removed_block = True

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

    removed_block = True

    def __init__(self, hidden_size: int, bias: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None

    def forward(self, x):
        out = torch.zeros_like(x)
        return out + self.bias if self.bias is not None else out


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` of ``root``."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def set_attention_widths(attn: nn.Module, num_heads: int, num_kv_heads: int, config_heads: bool) -> None:
    """Tell an HF attention module its new head counts (the attributes its forward reads)."""
    attn.num_key_value_groups = num_heads // num_kv_heads
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = num_kv_heads
    if hasattr(attn, "num_heads"):
        attn.num_heads = num_heads
    if config_heads:  # e.g. Phi-3 splits its fused qkv by config.num_attention_heads: give it its own copy
        cfg = copy.copy(attn.config)
        cfg.num_attention_heads, cfg.num_key_value_heads = num_heads, num_kv_heads
        attn.config = cfg


def _linear(old: nn.Linear, in_features: int, out_features: int, bias: bool | None = None) -> nn.Linear:
    bias = old.bias is not None if bias is None else bias
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def _rebuild(layer: nn.Module, layout: dict, sizes: dict, hidden: int, out_bias: dict) -> None:
    """Give ``layer`` fresh projections of the given output widths (``sizes``: role -> rows). ``out_bias``:
    role -> bias flag for the output projections (o, down), None to keep the old module's choice."""
    paths, done = layout["paths"], set()
    fused = {tuple(m): p for p, m in layout["fused"].items()}
    for role, rows in sizes.items():
        if role in done:
            continue
        group = next((m for m in fused if role in m), None)
        if group is not None:
            path = fused[group]
            old = layer.get_submodule(path)
            set_module(layer, path, _linear(old, hidden, sum(sizes[m] for m in group)))
            done.update(group)
            continue
        old = layer.get_submodule(paths[role])
        if role in out_bias:  # an output projection: `rows` is its input width
            set_module(layer, paths[role], _linear(old, rows, hidden, out_bias[role]))
        else:
            set_module(layer, paths[role], _linear(old, hidden, rows))
        done.add(role)


def reshape_layers(model, config, layout: dict = None) -> None:
    """Give each decoder layer of a freshly built model the widths the config lists for it."""
    layout = layout or LAYOUT
    heads = getattr(config, "layer_num_heads", None)
    kv_heads = getattr(config, "layer_num_kv_heads", None)
    inter = getattr(config, "layer_intermediate_size", None)
    attn_bias = list(getattr(config, "layer_attention_out_bias", None) or [])
    mlp_bias = list(getattr(config, "layer_mlp_out_bias", None) or [])
    head_dim, hidden = config.head_dim, config.hidden_size
    attn_path = layout["paths"]["o"].rpartition(".")[0]
    mlp_path = layout["paths"]["down"].rpartition(".")[0]
    for i, layer in enumerate(model.get_submodule(layout["layers"])):
        o_bias = bool(attn_bias[i]) if attn_bias else None
        d_bias = bool(mlp_bias[i]) if mlp_bias else None
        if heads is not None:
            h, kv = heads[i], kv_heads[i]
            if h == 0:
                set_module(layer, attn_path, PrunedAttention(i, head_dim, hidden, bias=bool(o_bias)))
            else:
                sizes = {"q": h * head_dim, "k": kv * head_dim, "v": kv * head_dim, "o": h * head_dim}
                _rebuild(layer, layout, sizes, hidden, {"o": o_bias})
                set_attention_widths(layer.get_submodule(attn_path), h, kv, layout["attention_reads_config_heads"])
        if inter is not None:
            n = inter[i]
            if n == 0:
                set_module(layer, mlp_path, PrunedMLP(hidden, bias=bool(d_bias)))
            else:
                _rebuild(layer, layout, {"gate": n, "up": n, "down": n}, hidden, {"down": d_bias})
                mlp = layer.get_submodule(mlp_path)
                if hasattr(mlp, "intermediate_size"):
                    mlp.intermediate_size = n


def make_classes(family: str = None, layout: dict = None):
    """The (config, causal-LM) classes for one base family."""
    layout = layout or LAYOUT
    family = family or layout["family"]
    mod = layout["hf_module"]
    base_config = getattr(importlib.import_module(f"transformers.models.{mod}.configuration_{mod}"),
                          layout["config_class"])
    base_model = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"),
                         layout["causal_lm_class"])

    class Config(base_config):
        model_type = f"edgeprune_{family}"

        def validate_architecture(self):
            # head_dim is explicit and layers carry their own head counts, so hidden_size need not divide.
            pass

    class ForCausalLM(base_model):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            reshape_layers(self, config, layout)

    Config.__name__ = Config.__qualname__ = "EdgePruneConfig"
    ForCausalLM.__name__ = ForCausalLM.__qualname__ = "EdgePruneForCausalLM"
    return Config, ForCausalLM


EdgePruneConfig, EdgePruneForCausalLM = make_classes(FAMILY)
