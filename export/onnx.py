"""Export dense and pruned checkpoints to ONNX with a KV cache, check parity, and quantize.

Graph interface (the names optimum and onnxruntime-genai use):

- inputs ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, past+seq] int64 (1 = real token, 0 = padding),
  ``position_ids`` [batch, seq] int64, and for every layer ``i`` that has attention
  ``past_key_values.{i}.key`` / ``past_key_values.{i}.value`` [batch, kv_heads_i, past, head_dim];
- outputs ``logits`` [batch, seq, vocab] float32 and ``present.{i}.key`` / ``present.{i}.value``
  [batch, kv_heads_i, past+seq, head_dim].

Batch, sequence and past length are dynamic; the first step feeds past tensors with past length 0. Each layer's
past tensors carry that layer's own KV head count (pruned models differ per layer): runtimes must read the head
counts from the graph's inputs, not from ``config.json``. A layer whose attention block was removed (0 heads) has
no past/present tensors at all: a 0-head tensor carries nothing, and zero-sized inputs trip up several runtimes.
Layer indices in the names are the decoder-layer indices, so they may have gaps (``past_key_values.2.*`` absent
when layer 2 has no attention). The past length is whatever the past tensors hold; the graph never reads it from
a layer without attention.

This module publishes an export: it checks the inputs, runs the steps in a temporary directory (trace:
``onnx_trace.py``; fp16/INT8: ``onnx_quant.py``, with ``onnx_smooth.py`` for the ``smooth-hybrid`` recipe; the
parity check: ``onnx_check.py``) and renames the directory into place only when every step passed. It does not
trace, convert or compare anything itself. The names other code imports from here (``check_onnx``,
``quantize_int8``, ``MODEL_FILE``, ...) are re-exported from those modules.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeprune.export.onnx_check import check_onnx, check_parity, encode_prompts, onnx_dtype
from edgeprune.export.onnx_files import DATA_FILE, MODEL_FILE, file_bytes, save_model
from edgeprune.export.onnx_quant import (
    DEFAULT_INT8,
    INT8_RECIPES,
    optimize_graph,
    quantize_dyn,
    quantize_int8,
    quantize_nbits,
    to_fp16,
)
from edgeprune.export.onnx_smooth import smooth_model
from edgeprune.export.onnx_trace import OPSET, trace_fp32
from edgeprune.export.parity import describe

from edgeprune.errors import EdgePruneError, first_line
from edgeprune.heap import trim_heap

ONNX_DTYPES = ("fp32", "fp16", "int8")
COPY_FILES = ("config.json", "generation_config.json", "modeling_edgeprune.py")
# onnxruntime's transformer optimizer: measured no faster on CPU (onnxruntime fuses the same at load time)
OPTIMIZE_DEFAULT = False


def _check_inputs(checkpoint_dir, out_dir, dtype: str) -> tuple[Path, Path]:
    if dtype not in ONNX_DTYPES:
        raise EdgePruneError(f"unknown ONNX dtype '{dtype}' (expected one of {', '.join(ONNX_DTYPES)})")
    src = Path(checkpoint_dir).expanduser()
    if not src.is_dir() or not (src / "config.json").is_file():
        raise EdgePruneError(f"{checkpoint_dir} is not a model directory (no config.json)")
    out = Path(out_dir).expanduser()
    if out.resolve() == src.resolve():
        raise EdgePruneError(f"output directory {out_dir} is the checkpoint directory itself")
    if out.exists() and not out.is_dir():
        raise EdgePruneError(f"output path {out_dir} exists and is not a directory")
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise EdgePruneError(f"output directory {out.resolve().parent} is not writable")
    return src, out


def export_onnx(checkpoint_dir, out_dir, dtype: str = "fp32", optimize: bool | None = None, *,
                int8_recipe: str | None = None, check: bool = True, prompts=None, n_tokens: int = 16) -> dict:
    """Export a checkpoint directory (dense or pruned) to ``out_dir``: ``model.onnx`` (+ ``model.onnx.data``: always
    for fp32, over 2 GB for fp16/int8), tokenizer files, ``config.json``, ``generation_config.json`` and ``manifest.json``.

    ``dtype``: fp32, fp16 (float16 weights and compute, float32 interface) or int8 (``int8_recipe``, default
    ``DEFAULT_INT8``). ``optimize``: run onnxruntime's transformer optimizer (None: ``OPTIMIZE_DEFAULT``, off: it
    measured no faster). The parity check (``check_onnx``) runs before the directory is published; a failed
    check raises ``EdgePruneError`` and leaves nothing behind, as does any other failure. Returns the info dict
    (also written to the manifest), with the check's result under ``parity``.
    """
    src, out = _check_inputs(checkpoint_dir, out_dir, dtype)
    recipe = int8_recipe or DEFAULT_INT8
    if recipe not in INT8_RECIPES:
        raise EdgePruneError(f"unknown int8 recipe '{recipe}' (expected one of {', '.join(INT8_RECIPES)})")
    optimize = OPTIMIZE_DEFAULT if optimize is None else bool(optimize)
    try:
        return _export(src, out, dtype, optimize, recipe, check, prompts, n_tokens)
    except OSError as e:  # disk full, permissions changing under us...: one line, nothing left behind
        raise EdgePruneError(f"ONNX export to {out} failed: {e.strerror or e}") from None


def _export(src: Path, out: Path, dtype: str, optimize: bool, recipe: str, check: bool, prompts,
            n_tokens: int) -> dict:
    from edgeprune.io import MANIFEST, atomic_dir, manifest, write_json
    from edgeprune.models import load

    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        lm = load(str(src))
        cfg = lm.model.config
        info: dict[str, Any] = {"format": "onnx", "file": MODEL_FILE, "dtype": dtype, "opset": OPSET,
                                "exporter": "torch.onnx.export (TorchScript)", "source": str(src),
                                "family": lm.adapter.family, "num_layers": cfg.num_hidden_layers,
                                "vocab_size": cfg.vocab_size, "runtime_versions": _runtime_versions()}
        work = Path(tempfile.mkdtemp(prefix=".work", dir=tmp))
        try:
            current = work / MODEL_FILE  # float32 graph, weights in model.onnx.data beside it
            if dtype == "int8" and recipe == "smooth-hybrid":  # in place: parity reloads the unsmoothed model
                info["smoothing"] = smooth_model(lm)
            # the tokenizer's part is done before the trace, which it would otherwise sit through (330 MiB for
            # Gemma 3's 262k-token vocabulary)
            _copy_side_files(lm.tokenizer, src, tmp)
            encoded = encode_prompts(lm.tokenizer, prompts)
            lm.tokenizer = None
            try:
                info.update(trace_fp32(lm, current))
            except Exception as e:  # the tracer raises many types; report one line
                raise EdgePruneError(f"ONNX export of {src} failed: {first_line(e)}") from None
            del lm  # conversion and quantization read the graph's weights from disk, not from torch
            gc.collect()
            trim_heap()  # the freed model's heap goes back to the OS before the graph's weights are read again
            if optimize:
                info["optimizer"] = optimize_graph(current, work / "opt.onnx")
                current = work / "opt.onnx"
            info["optimized"] = optimize
            final = tmp / MODEL_FILE
            try:
                if dtype == "fp32":
                    _move_model(current, final)
                elif dtype == "fp16":
                    info["conversion"] = to_fp16(current, final)
                else:
                    info["quantization"] = {"recipe": recipe, **quantize_int8(current, final, recipe)}
            except (EdgePruneError, OSError):
                raise
            except Exception as e:  # onnx/onnxruntime tooling errors: one line, like every other failure
                raise EdgePruneError(f"ONNX {dtype} conversion of {src} failed: {first_line(e)}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        info["external_data"] = (tmp / DATA_FILE).exists()
        info["size_bytes"] = file_bytes(tmp / MODEL_FILE)
        if check:
            result = check_parity(tmp, encoded, lambda: load(str(src)).model, n_tokens, dtype)
            info["parity"] = result
            if not result["passed"]:
                raise EdgePruneError(f"ONNX parity check failed ({dtype}): {describe(result)}")
        info["seconds"] = round(time.perf_counter() - start, 2)
        write_json(tmp / MANIFEST, manifest("onnx-export", **info))
        _publishable(tmp)
    return info


def _runtime_versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _publishable(tmp: Path) -> None:
    """mkstemp creates 0600 files: give the artifact's files the mode a plain open would (atomic_dir already gives
    the directory a plain mkdir's)."""
    from edgeprune.io import current_umask

    mask = current_umask()
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def _move_model(src: Path, dst: Path) -> None:
    """Publish a graph under ``dst``. Its external data is moved, not rewritten: reading a graph back into one
    file costs about three times its weights in memory (the proto, its serialised bytes, the file read), the
    largest step of a float32 export before (2.2 GB for SmolLM2-135M's 0.54 GB)."""
    data = src.with_name(src.name + ".data")
    if not data.exists():
        os.replace(src, dst)
        return
    if data.name == dst.name + ".data":
        os.replace(data, dst.with_name(data.name))
        os.replace(src, dst)
        return
    import onnx

    save_model(onnx.load(str(src), load_external_data=True), dst)


def _copy_side_files(tokenizer, src: Path, dst: Path) -> None:
    import json

    tokenizer.save_pretrained(dst)
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    # transformers 5 names its fast tokenizer class TokenizersBackend, which transformers 4 (optimum's
    # ORTModelForCausalLM users) does not know; PreTrainedTokenizerFast loads the same tokenizer.json in both
    cfg = dst / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


__all__ = ["DATA_FILE", "DEFAULT_INT8", "INT8_RECIPES", "MODEL_FILE", "ONNX_DTYPES", "check_onnx", "export_onnx",
           "onnx_dtype", "quantize_dyn", "quantize_int8", "quantize_nbits", "save_model"]
