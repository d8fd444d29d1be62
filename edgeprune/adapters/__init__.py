"""Model adapters: look up the adapter for a loaded model, or check that a model type is supported.

The families and their facts are in ``families.py`` (torch-free); each family's adapter class is in its own
module. Importing this package imports no torch.
"""

from __future__ import annotations

from edgeprune.adapters.families import FAMILIES, family_for, family_for_gguf_arch
from edgeprune.errors import EdgePruneError

SUPPORTED = tuple(FAMILIES)


def adapter_classes():
    from edgeprune.adapters.gemma3 import Gemma3TextAdapter
    from edgeprune.adapters.glm import Glm4Adapter, GlmAdapter
    from edgeprune.adapters.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter
    from edgeprune.adapters.phi3 import Phi3Adapter

    return (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma3TextAdapter, Phi3Adapter, GlmAdapter,
            Glm4Adapter)


def _unsupported(model_type: str) -> EdgePruneError:
    return EdgePruneError(f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED)}")


def get_adapter(model):
    for cls in adapter_classes():
        if cls.handles(model):
            return cls(model)
    raise _unsupported(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def check_model_type(model_type: str) -> None:
    """Raise a one-line error unless an HF ``model_type`` (or a GGUF architecture) belongs to a family."""
    if family_for(model_type) is None and family_for_gguf_arch(model_type) is None:
        raise _unsupported(model_type)
