"""Writing the GGUF file: ``export_gguf`` turns a checkpoint into a .gguf atomically.

Layout (``layout.py``) and tokenizer (``tokenizer.py``) decide the content; this module streams it through
gguf-py's ``GGUFWriter`` tensor by tensor (1-D tensors stay f32, matrices follow the dtype: f32, f16, or q8_0
with an f16 fallback for rows that are not a multiple of 32) and, for q4_k_m, quantizes an f32 file with
llama.cpp's own quantizer. The file appears at ``out_path`` only when complete (a temp file beside it, then
``os.replace``). It needs numpy, safetensors and gguf (llama-cpp-python only for q4_k_m), not torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from edgeprune.export.gguf.layout import Layout, OutTensor, plan
from edgeprune.export.gguf.reader import FILE_TYPE, tensor_types
from edgeprune.export.gguf.source import Tensors, model_config, resolve_checkpoint
from edgeprune.export.gguf.tokenizer import read_tokenizer

from edgeprune.errors import EdgePruneError, first_line
from edgeprune.io import check_writable_parent, sha256_file

GGUF_DTYPES = tuple(FILE_TYPE)


def _encode(out: OutTensor, dtype: str):
    """(array to write, GGML type) for one tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    arr = out.load()
    if arr.shape != out.shape:
        raise EdgePruneError(f"internal error: {out.name} has shape {arr.shape}, expected {out.shape}")
    if not out.matrix or dtype == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32), Q.F32
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return quantize(arr, Q.Q8_0), Q.Q8_0
    return arr.astype(np.float16), Q.F16


def _nbytes(out: OutTensor, dtype: str) -> tuple[int, Any]:
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES

    n = int(np.prod(out.shape))
    if not out.matrix or dtype == "f32":
        return 4 * n, Q.F32
    if dtype == "q8_0" and out.shape[-1] % 32 == 0:
        block, size = GGML_QUANT_SIZES[Q.Q8_0]
        return n // block * size, Q.Q8_0
    return 2 * n, Q.F16


def _add_value(w, key: str, value) -> None:
    """One hyper-parameter, typed as llama.cpp reads it (ints uint32, floats float32, arrays by element)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def _write(path: Path, layout: Layout, tok: dict, dtype: str, name: str) -> dict:
    w = gguf.GGUFWriter(str(path), layout.arch)
    w.add_name(name)
    w.add_file_type(FILE_TYPE[dtype])
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in layout.kv.items():
        _add_value(w, key, value)
    w.add_array("edgeprune.source_layers", [x.src for x in layout.layers])
    for key, value in tok["kv"].items():
        _add_value(w, key, value)
    types: dict[str, int] = {}
    for out in layout.tensors:
        nbytes, qtype = _nbytes(out, dtype)
        w.add_tensor_info(out.name, out.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for out in layout.tensors:
        w.write_tensor_data(_encode(out, dtype)[0])
    w.close()
    return types


def _quantize_llama_cpp(src: Path, dst: Path, dtype: str) -> None:
    try:
        import llama_cpp
        from llama_cpp._utils import suppress_stdout_stderr
    except ImportError:
        raise EdgePruneError(f"dtype {dtype} needs llama-cpp-python: pip install 'edgeprune[gguf-runtime]'") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPE[dtype]
    params.nthread = max(1, os.cpu_count() or 1)
    with suppress_stdout_stderr(disable=False):  # one fallback warning per tensor whose rows are not 256-aligned
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise EdgePruneError(f"llama.cpp could not quantize {src.name} to {dtype} (code {rc})")


def _model_name(name: str, tokens: list[str]) -> str:
    """general.name. llama.cpp's vocabulary loader looks up "<unk>", "<s>", "</s>" and "<|endoftext|>" in any
    model whose name contains "phi3" or "phi-3" and fails to load it when one is missing (a pruned or tiny
    Phi-3 with another tokenizer): such names are written with the digit spelled out."""
    vocab = set(tokens)
    if re.search(r"phi-?3", name, re.I) and not {"<unk>", "<s>", "</s>", "<|endoftext|>"} <= vocab:
        return re.sub(r"(phi-?)3", r"\1three", name, flags=re.I)
    return name


def export_gguf(checkpoint_dir, out_path, dtype: str = "f16", *, pre_tokenizer: str | None = None) -> dict:
    """Write ``checkpoint_dir`` (an HF directory of a supported family, dense or edgeprune-pruned) as a GGUF file.

    Returns an info dict (arch, dtype, size_bytes, sha256, per-layer shapes, folded biases, tokenizer, notes).
    """
    start = time.perf_counter()
    if dtype not in GGUF_DTYPES:
        raise EdgePruneError(f"unknown GGUF dtype {dtype!r} (choose from {', '.join(GGUF_DTYPES)})")
    ckpt = resolve_checkpoint(Path(checkpoint_dir).expanduser())
    out = Path(out_path).expanduser()
    cfg, fam = model_config(ckpt)
    if out.is_dir():
        raise EdgePruneError(f"output path {out} is a directory")
    check_writable_parent(out)
    layout = plan(ckpt, cfg, fam, Tensors(ckpt))
    tok = read_tokenizer(ckpt, cfg, layout.n_vocab, pre_tokenizer)
    name = _model_name(Path(str(cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or ckpt.name)).name,
                       tok["kv"][gguf.Keys.Tokenizer.LIST])
    temps: list[str] = []

    def temp(suffix: str) -> Path:
        fd, p = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent)
        os.close(fd)
        temps.append(p)
        return Path(p)

    try:
        final = temp(".tmp")
        if dtype == "q4_k_m":
            base = temp(".f32.tmp")
            _write(base, layout, tok, "f32", name)
            _quantize_llama_cpp(base, final, dtype)
            types = tensor_types(final)
        else:
            types = _write(final, layout, tok, dtype, name)
        digest, size = sha256_file(final), final.stat().st_size
        os.chmod(final, 0o644)
        os.replace(final, out)
    except OSError as e:
        raise EdgePruneError(f"cannot write {out}: {e.strerror or first_line(e)}") from None
    finally:
        for p in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    return _info(layout, tok, out, dtype, size, digest, ckpt, types, time.perf_counter() - start)


def _info(layout: Layout, tok: dict, out: Path, dtype: str, size: int, digest: str, ckpt: Path, types: dict,
          seconds: float) -> dict:
    layers = layout.layers
    return {
        "path": str(out), "format": "gguf", "arch": layout.arch, "dtype": dtype, "file_type": FILE_TYPE[dtype],
        "size_bytes": size, "sha256": digest, "source": str(ckpt), "family": layout.family,
        "hidden_size": layout.hidden, "head_dim": layout.head_dim, "rope_dims": layout.n_rot,
        "vocab_size": layout.n_vocab, "n_layers": len(layers), "source_layers": layout.n_layer_hf,
        "dropped_layers": sorted(set(range(layout.n_layer_hf)) - {x.src for x in layers}),  # identity layers
        "layers": [{"source_layer": x.src, "heads": x.heads, "kv_heads": x.kv_heads, "ffn": x.hf_ffn,
                    "gguf_ffn": x.ffn} for x in layers],
        "placeholder_ffn_layers": [x.src for x in layers if not x.hf_ffn and x.src >= 0],
        "zero_layer_in_front": layout.zero_layer, "folded_biases": layout.folded, "tied_embeddings": layout.tied,
        "rope": {"type": layout.rope["rope_type"], "theta": layout.rope["rope_theta"]}, "notes": layout.notes,
        "tokenizer": {k: tok[k] for k in ("model", "pre", "pre_source", "add_bos", "n_tokens", "n_merges")},
        "tensor_types": types, "seconds": seconds,
    }
