"""The model-adapter seam (the SliceGPT pattern): every architecture detail lives behind these two classes.

Algorithms (scorers, allocators, surgery, refit, evaluation) talk to a ModelAdapter and its LayerAdapters through
named projections (``layer.attention_projections().o``, ``layer.mlp_projections().down``), norms, the head and
rotary layout and the bias flags. They never name a model class, a module path or an HF tensor name. A family
with fused projections (Phi-3's ``qkv_proj``) hands out :class:`FusedRows` views, so callers see the same units
(q/k/v rows, gate/up rows) as for Llama; the adapter rebuilds the fused Linear when surgery replaces them.

This module defines the interface and the family-neutral helpers (``LayerShape``, ``is_uniform``); it holds no
family's module names (those are in ``families.py`` and the per-family adapter files).
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edgeprune.adapters.families import Family


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder layer. 0 heads: no attention block; 0 channels: no MLP block."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def is_uniform(shapes: list[LayerShape]) -> bool:
    """Every layer has the same widths and keeps both blocks (a stock config can describe it)."""
    return len({(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes}) <= 1 and all(
        s.num_heads > 0 and s.intermediate_size > 0 for s in shapes
    )


class AttentionProjections(NamedTuple):
    """A layer's attention projections by role: nn.Linear or FusedRows (weight rows = output features)."""

    q: Any
    k: Any
    v: Any
    o: Any


class MlpProjections(NamedTuple):
    """A layer's gated-MLP projections by role: ``down(act(gate(x)) * up(x))``."""

    gate: Any
    up: Any
    down: Any


class LayerNorms(NamedTuple):
    """A layer's norms by role (None where the family has none). ``attention_input`` and ``mlp_input`` always
    exist; ``attention_output`` / ``mlp_output`` normalise a block's output before the residual add (Gemma 3,
    GLM-4); ``q`` / ``k`` normalise each head's queries / keys (Qwen3, Gemma 3)."""

    attention_input: Any
    mlp_input: Any
    attention_output: Any = None
    mlp_output: Any = None
    q: Any = None
    k: Any = None


@dataclass(frozen=True)
class HeadLayout:
    """Grouped-query attention layout of one layer: query heads, KV heads, head_dim."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


@dataclass(frozen=True)
class RotaryLayout:
    """How RoPE is applied: to the first ``rope_dims`` of each head (partial rotary), in halves or in
    interleaved pairs, with ``rope_type`` scaling (default, linear, llama3, longrope, ...)."""

    head_dim: int
    rope_dims: int
    interleaved: bool
    rope_type: str
    theta: float | None

    @property
    def partial_rotary_factor(self) -> float:
        return self.rope_dims / self.head_dim if self.head_dim else 1.0


@dataclass(frozen=True)
class LayerBiases:
    """Which projections of a layer carry a bias."""

    q: bool
    k: bool
    v: bool
    o: bool
    gate: bool
    up: bool
    down: bool


class FusedRows:
    """Rows ``[start, stop)`` of a fused nn.Linear seen as one projection (e.g. the k rows of Phi-3's qkv_proj).

    ``weight`` and ``bias`` are views: in-place writes (masking) reach the fused parameter. A forward pre-hook
    sees the fused Linear's input, which is this role's input too. Gradients live on the fused parameter
    (``weight_source`` says where)."""

    def __init__(self, linear: nn.Linear, start: int, stop: int, role: str = ""):
        self.linear, self.start, self.stop, self.role = linear, start, stop, role

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.linear.bias
        return None if b is None else b[self.start : self.stop]

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def register_forward_pre_hook(self, hook):
        return self.linear.register_forward_pre_hook(hook)

    def __repr__(self) -> str:
        return f"FusedRows({self.role}, rows {self.start}:{self.stop} of {self.linear!r})"


def weight_source(proj) -> tuple[nn.Parameter, slice]:
    """The parameter that holds ``proj``'s weight and the rows that are ``proj``'s (all rows for a Linear)."""
    if isinstance(proj, FusedRows):
        return proj.linear.weight, proj.rows
    return proj.weight, slice(None)


class LayerAdapter(abc.ABC):
    """One decoder layer: its attention and MLP projections, norms and head layout, and how to rebuild them."""

    def __init__(self, layer: nn.Module, index: int, head_dim: int, family: Family | None = None):
        self.layer = layer
        self.index = index
        self.head_dim = head_dim
        self.family = family

    # ---- modules --------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def attention(self) -> nn.Module:
        """The attention block (a removed block is a stub whose ``removed_block`` is True)."""

    @property
    @abc.abstractmethod
    def mlp(self) -> nn.Module:
        """The MLP block (or its stub)."""

    @property
    def has_attention(self) -> bool:
        return not getattr(self.attention, "removed_block", False)

    @property
    def has_mlp(self) -> bool:
        return not getattr(self.mlp, "removed_block", False)

    @abc.abstractmethod
    def attention_projections(self) -> AttentionProjections:
        """q, k, v, o by name (only when ``has_attention``)."""

    @abc.abstractmethod
    def mlp_projections(self) -> MlpProjections:
        """gate, up, down by name (only when ``has_mlp``)."""

    @abc.abstractmethod
    def norms(self) -> LayerNorms:
        """The layer's norms by role."""

    @property
    def attention_input_norm(self) -> nn.Module:
        return self.norms().attention_input

    @property
    def mlp_input_norm(self) -> nn.Module:
        """The norm whose input is the residual stream between the attention and the MLP block."""
        return self.norms().mlp_input

    # ---- layout ---------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.attention_projections().q.out_features // self.head_dim if self.has_attention else 0

    @property
    def num_kv_heads(self) -> int:
        return self.attention_projections().k.out_features // self.head_dim if self.has_attention else 0

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    @property
    def head_layout(self) -> HeadLayout:
        return HeadLayout(self.num_heads, self.num_kv_heads, self.head_dim)

    @property
    def intermediate_size(self) -> int:
        return self.mlp_projections().gate.out_features if self.has_mlp else 0

    @property
    def shape(self) -> LayerShape:
        return LayerShape(self.num_heads, self.num_kv_heads, self.intermediate_size)

    @property
    def biases(self) -> LayerBiases:
        a = self.attention_projections() if self.has_attention else None
        m = self.mlp_projections() if self.has_mlp else None
        attn = {r: a is not None and getattr(a, r).bias is not None for r in ("q", "k", "v", "o")}
        mlp = {r: m is not None and getattr(m, r).bias is not None for r in ("gate", "up", "down")}
        if a is None:  # a stub keeps an output bias when bias compensation gave it one
            attn["o"] = getattr(self.attention, "bias", None) is not None
        if m is None:
            mlp["down"] = getattr(self.mlp, "bias", None) is not None
        return LayerBiases(**attn, **mlp)

    # ---- rebuilding -----------------------------------------------------------------------------
    @abc.abstractmethod
    def replace_attention(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear) -> None:
        """Install smaller q/k/v/o Linears (a fused family fuses them again)."""

    @abc.abstractmethod
    def remove_attention(self, out_bias=None) -> None:
        """Replace the attention block by a stub (adding ``out_bias`` to the residual when given)."""

    @abc.abstractmethod
    def replace_mlp(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        """Install smaller gate/up/down Linears."""

    @abc.abstractmethod
    def remove_mlp(self, out_bias=None) -> None:
        """Replace the MLP block by a stub."""


class ModelAdapter(abc.ABC):
    """A whole causal LM: embeddings, decoder layers, final norm, head, config."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    layer_adapter_cls: ClassVar[type[LayerAdapter]]

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        model_type = getattr(model.config, "model_type", "")
        return model_type in cls.model_types or model_type == f"edgeprune_{cls.family}"

    @property
    def spec(self) -> Family:
        """This family's row of the torch-free table (tensor names, fused layout, quirks)."""
        from edgeprune.adapters.families import get_family

        return get_family(self.family)

    @property
    def config(self):
        return self.model.config

    @property
    @abc.abstractmethod
    def layers(self) -> list[LayerAdapter]:
        """One adapter per decoder layer, in order."""

    @property
    @abc.abstractmethod
    def embed_tokens(self) -> nn.Module:
        """The token embedding."""

    @property
    @abc.abstractmethod
    def lm_head(self) -> nn.Module:
        """The output projection to the vocabulary."""

    @property
    @abc.abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm after the last layer."""

    @property
    @abc.abstractmethod
    def decoder(self) -> nn.Module:
        """The module that owns the layers (runs embeddings -> layers -> norm)."""

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.config.num_attention_heads

    @property
    def rotary(self) -> RotaryLayout:
        cfg = self.config
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        if "full_attention" in rope:  # per layer type (Gemma 3): the global layers' settings
            rope = dict(rope["full_attention"])
        factor = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
        dims = int(self.head_dim * factor)
        return RotaryLayout(self.head_dim, dims, self.spec.rope_interleaved, rope.get("rope_type", "default"),
                            rope.get("rope_theta"))

    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.layers]

    @abc.abstractmethod
    def drop_layers(self, indices: list[int]) -> None:
        """Remove whole decoder layers (and their entries in per-layer config lists)."""

    @abc.abstractmethod
    def sync_config(self) -> None:
        """Write the current per-layer shapes back into the config (after surgery)."""
