"""Model adapters: look up the adapter for a loaded model."""

from __future__ import annotations

from edgeprune.errors import EdgePruneError

SUPPORTED = ("llama", "mistral", "qwen2")


def adapter_classes():
    from edgeprune.adapters.llama import LlamaAdapter, MistralAdapter, Qwen2Adapter

    return (LlamaAdapter, MistralAdapter, Qwen2Adapter)


def get_adapter(model):
    for cls in adapter_classes():
        if cls.handles(model):
            return cls(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise EdgePruneError(
        f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED)} (Llama family with GQA)"
    )


def check_model_type(model_type: str) -> None:
    base = model_type.removeprefix("edgeprune_")
    if base not in SUPPORTED:
        raise EdgePruneError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED)} (Llama family with GQA)"
        )
