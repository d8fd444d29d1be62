"""GGUF export for llama.cpp, in parts:

- ``source``: the checkpoint (directory, config, family, RoPE, safetensors tensors);
- ``archs``: what each llama.cpp architecture can represent; ``layout``: which tensors go where, from the
  family table (``edgeprune/adapters/families.py``); ``hparams``: the architecture's keys;
- ``tokenizer``: ``tokenizer.ggml.*``; ``writer``: ``export_gguf`` (atomic file write, quantization);
- ``reader``: the one way to read a GGUF (header keys, tensor types, the file's dtype);
- ``runtime``: the one llama.cpp context policy, logits and ``gguf_perplexity``;
- ``check``: ``check_gguf``, the parity check (``edgeprune.export.parity.ParityRecord``).

Importing this package loads numpy and gguf, not torch; ``check_gguf`` needs torch/transformers and
llama-cpp-python.
"""

from edgeprune.export.gguf.check import DEFAULT_PROMPTS, MAX_MEAN_KL, MIN_TOP1, TOLERANCE, check_gguf
from edgeprune.export.gguf.layout import PLACEHOLDER_FFN
from edgeprune.export.gguf.reader import gguf_dtype
from edgeprune.export.gguf.runtime import gguf_perplexity, llama_context
from edgeprune.export.gguf.writer import GGUF_DTYPES, export_gguf

__all__ = ["DEFAULT_PROMPTS", "GGUF_DTYPES", "MAX_MEAN_KL", "MIN_TOP1", "PLACEHOLDER_FFN", "TOLERANCE", "check_gguf",
           "export_gguf", "gguf_dtype", "gguf_perplexity", "llama_context"]


def __getattr__(name: str):
    # edgeprune/pipeline.py's built-in profiler imports this switch from here (see runtime.py)
    if name == "no_extra_buffer_types":
        from edgeprune.devices.llama_generate import no_extra_buffer_types

        return no_extra_buffer_types
    raise AttributeError(f"module 'edgeprune.export.gguf' has no attribute {name!r}")
