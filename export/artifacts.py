"""One entry point for `edgeprune export`: a checkpoint (or model spec) in, an artifact directory out.

An artifact directory holds the model file (``model.onnx`` or ``model.gguf``), the tokenizer files a device
needs, and ``manifest.json`` with what made it and its parity check. It is written to a temp directory and
renamed into place only after the check passed; a directory without a manifest is not an artifact.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from edgeprune.errors import EdgePruneError

FORMATS = ("onnx", "gguf")
# CLI dtype -> (onnx dtype, gguf dtype)
DTYPES = {"fp32": ("fp32", "f32"), "fp16": ("fp16", "f16"), "int8": ("int8", "q8_0"), "q8_0": (None, "q8_0"),
          "q4_k_m": (None, "q4_k_m")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json")


def resolve_checkpoint(spec: str) -> Path:
    """A directory holding config.json + safetensors: the checkpoint itself, or the cache of a GGUF or of a
    packaged model name (``default``, ``gemma3-270m``)."""
    from edgeprune.models import load
    from edgeprune.models.loader import gguf_cache_path, packaged_gguf

    path = Path(spec).expanduser()
    packaged = packaged_gguf(spec)
    if packaged is None and path.is_dir():
        if not (path / "config.json").is_file():
            raise EdgePruneError(f"{spec} is not a model directory (no config.json)")
        return path
    gguf = packaged or (path if path.suffix == ".gguf" else None)
    if gguf is not None:
        if not gguf.is_file():
            raise EdgePruneError(f"model not found: {spec}")
        cache = gguf_cache_path(gguf)
        if not (cache / "manifest.json").is_file():
            load(str(gguf))  # dequantizes and writes the cache
        if not (cache / "manifest.json").is_file():
            raise EdgePruneError(f"could not cache {gguf} as safetensors (is the cache directory writable?)")
        return cache
    raise EdgePruneError(f"model not found: {spec} (export needs a local model directory, a .gguf, 'default' "
                         "or a packaged model name)")


def default_output(ckpt_spec: str, fmt: str, dtype: str) -> Path:
    name = "default" if ckpt_spec == "default" else Path(ckpt_spec).name.removesuffix(".gguf")
    return Path("artifacts") / f"{name}-{fmt}-{dtype}"


def export_artifact(spec: str, fmt: str, dtype: str, out: Path, optimize: bool | None = None) -> dict:
    if fmt not in FORMATS:
        raise EdgePruneError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise EdgePruneError(f"unknown dtype '{dtype}'; choose from {', '.join(DTYPES)}")
    onnx_dtype, gguf_dtype = DTYPES[dtype]
    if fmt == "onnx" and onnx_dtype is None:
        raise EdgePruneError(f"dtype {dtype} is a GGUF type; ONNX takes fp32, fp16 or int8")
    ckpt = resolve_checkpoint(spec)
    if fmt == "onnx":
        from edgeprune.export.onnx import export_onnx

        return export_onnx(ckpt, out, onnx_dtype, optimize)
    return export_gguf_artifact(ckpt, out, gguf_dtype)


def export_gguf_artifact(ckpt: Path, out: Path, dtype: str, require_parity: bool = True) -> dict:
    """Write and check a GGUF artifact. ``require_parity=False`` (benchmarks only: random-weight models, whose
    near-flat logits flip top-1 at near-ties, or measuring a file that fails) keeps a file whose check failed,
    with ``parity_failed_at_export`` in its manifest; the CLI always requires the check."""
    from edgeprune.export.gguf import check_gguf, export_gguf

    from edgeprune.io import MANIFEST, atomic_dir, manifest, write_json

    if out.exists() and not out.is_dir():
        raise EdgePruneError(f"output path {out} exists and is not a directory")
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        info = export_gguf(ckpt, tmp / "model.gguf", dtype)
        info["path"] = "model.gguf"
        for name in TOKENIZER_FILES:
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)
        parity = check_gguf(tmp / "model.gguf", ckpt)
        info["parity"] = parity
        if not parity.get("passed") and not require_parity:
            info["parity_failed_at_export"] = True
        elif not parity.get("passed"):
            raise EdgePruneError(f"GGUF parity check failed ({dtype}): max |logit diff| "
                                 f"{parity.get('max_abs_logit_diff'):.4g}, mean KL {parity.get('mean_kl'):.4g}, "
                                 f"top-1 agreement {parity.get('top1_agreement'):.3f}, greedy match "
                                 f"{parity.get('greedy_match')} (tolerances: {parity.get('tolerance')})")
        info["seconds"] = round(time.perf_counter() - start, 2)
        info.update(format="gguf", source=str(ckpt))
        write_json(tmp / MANIFEST, manifest("gguf-export", **info))
    return info
