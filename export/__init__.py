"""Exporters for edge runtimes. Importing this package loads neither torch nor transformers; the GGUF names
below are resolved lazily from ``edgeprune.export.gguf``."""

_GGUF_NAMES = ("GGUF_DTYPES", "export_gguf", "check_gguf", "gguf_perplexity", "gguf_dtype")


def __getattr__(name: str):
    if name in _GGUF_NAMES:
        from edgeprune.export import gguf

        return getattr(gguf, name)
    raise AttributeError(f"module 'edgeprune.export' has no attribute {name!r}")
