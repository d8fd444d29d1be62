"""The model-adapter seam (the SliceGPT pattern): every architecture detail lives behind these two classes.

Algorithms (scorers, allocators, surgery, evaluation) talk to a ModelAdapter and its LayerAdapters and never
name a model class or a module path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder layer. 0 heads: no attention block; 0 channels: no MLP block."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class LayerAdapter:
    """One decoder layer: its attention and MLP projections, norms and head layout."""

    def __init__(self, layer: nn.Module, index: int, head_dim: int):
        self.layer = layer
        self.index = index
        self.head_dim = head_dim

    # ---- modules --------------------------------------------------------------------------------
    @property
    def attention(self) -> nn.Module:
        raise NotImplementedError

    @property
    def mlp(self) -> nn.Module:
        raise NotImplementedError

    @property
    def has_attention(self) -> bool:
        return hasattr(self.attention, "q_proj")

    @property
    def has_mlp(self) -> bool:
        return hasattr(self.mlp, "gate_proj")

    def attention_projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(q, k, v, o) linear layers."""
        raise NotImplementedError

    def mlp_projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """(gate, up, down) linear layers."""
        raise NotImplementedError

    @property
    def attention_input_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def mlp_input_norm(self) -> nn.Module:
        raise NotImplementedError

    # ---- layout ---------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.attention_projections()[0].out_features // self.head_dim if self.has_attention else 0

    @property
    def num_kv_heads(self) -> int:
        return self.attention_projections()[1].out_features // self.head_dim if self.has_attention else 0

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    @property
    def intermediate_size(self) -> int:
        return self.mlp_projections()[0].out_features if self.has_mlp else 0

    @property
    def shape(self) -> LayerShape:
        return LayerShape(self.num_heads, self.num_kv_heads, self.intermediate_size)

    # ---- rebuilding -----------------------------------------------------------------------------
    def replace_attention(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear) -> None:
        raise NotImplementedError

    def remove_attention(self, out_bias=None) -> None:
        raise NotImplementedError

    def replace_mlp(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        raise NotImplementedError

    def remove_mlp(self, out_bias=None) -> None:
        raise NotImplementedError


class ModelAdapter:
    """A whole causal LM: embeddings, decoder layers, final norm, head, config."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    layer_adapter_cls: ClassVar[type[LayerAdapter]] = LayerAdapter

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        model_type = getattr(model.config, "model_type", "")
        return model_type in cls.model_types or model_type == f"edgeprune_{cls.family}"

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> list[LayerAdapter]:
        raise NotImplementedError

    @property
    def embed_tokens(self) -> nn.Module:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def decoder(self) -> nn.Module:
        """The module that owns the layers (runs embeddings -> layers -> norm)."""
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.config.num_attention_heads

    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.layers]

    def drop_layers(self, indices: list[int]) -> None:
        raise NotImplementedError

    def sync_config(self) -> None:
        """Write the current per-layer shapes back into the config (after surgery)."""
        raise NotImplementedError
