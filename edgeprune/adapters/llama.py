"""Adapters for the Llama family with grouped-query attention: Llama (SmolLM2, Llama 3), Mistral, Qwen2, Qwen3.

They share module names (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input/post_attention norms);
Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms instead, and Mistral/Qwen2/Qwen3 may use sliding-window
attention, which pruning leaves alone. Llama 3's rope scaling is a config setting, not a different family.
Everything else comes from the family table (``families.py``) through the generic decoder adapter.
"""

from __future__ import annotations

from edgeprune.adapters.base import is_uniform  # noqa: F401  (kept importable from here for old callers)
from edgeprune.adapters.decoder import DecoderAdapter, DecoderLayerAdapter

LlamaLayerAdapter = DecoderLayerAdapter


class LlamaAdapter(DecoderAdapter):
    family = "llama"
    model_types = ("llama",)


class MistralAdapter(DecoderAdapter):
    family = "mistral"
    model_types = ("mistral",)


class Qwen2Adapter(DecoderAdapter):
    family = "qwen2"
    model_types = ("qwen2",)


class Qwen3Adapter(DecoderAdapter):
    family = "qwen3"
    model_types = ("qwen3",)
