"""Reading GGUF files: the one place the exporter, its checks and the tokenizer look inside a .gguf.

- Key/value metadata: ``edgeprune.devices.llama_generate.gguf_metadata``, the standard-library header parser the
  device side already ships (gguf-py is not a device dependency, so devices cannot use it). The host uses the
  same parser rather than gguf-py's ``GGUFReader``, which builds every field of the file up front: 9 s for the
  default model's 49k-token vocabulary on this machine, against a fraction of a second here.
- The tensor table (names and GGML types, after llama.cpp quantized a file): gguf-py's ``GGUFReader``.

It does not interpret what it reads (dtype names, tokenizer choices live with their users).
"""

from __future__ import annotations

import struct
from pathlib import Path

from edgeprune.errors import EdgePruneError, first_line

# llama_ftype values of the dtypes edgeprune writes
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}
_FILE_TYPE_NAME = {v: k for k, v in FILE_TYPE.items()}


def metadata(path, keys: tuple[str, ...] | None = None, *, full_arrays: bool = False) -> dict:
    """The header's key/values (only ``keys`` when given). Arrays longer than 4096 entries (the vocabulary) come
    back as ``{"array_len": n}`` unless ``full_arrays``."""
    from edgeprune.devices.llama_generate import gguf_metadata

    try:
        meta = gguf_metadata(path, max_array=2**62 if full_arrays else 4096)
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise EdgePruneError(f"{path} is not a readable GGUF file: {first_line(e)}") from None
    return meta if keys is None else {k: meta[k] for k in keys if k in meta}


def gguf_dtype(gguf_path) -> str:
    """The export dtype of a GGUF file, from ``general.file_type`` ("f32", "f16", "q8_0", "q4_k_m" or "ftype-N")."""
    if not Path(gguf_path).is_file():
        raise EdgePruneError(f"GGUF file not found: {gguf_path}")
    ft = metadata(gguf_path, ("general.file_type",)).get("general.file_type", 0)
    return _FILE_TYPE_NAME.get(int(ft), f"ftype-{ft}")


def tensor_types(path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
