"""Load causal LMs: the default model, local HF directories (dense or pruned), local GGUF files, hub ids."""

from edgeprune.models.loader import DEFAULT_MODEL, LoadedModel, cache_dir, load, resolve_default_gguf

__all__ = ["DEFAULT_MODEL", "LoadedModel", "cache_dir", "load", "resolve_default_gguf"]
