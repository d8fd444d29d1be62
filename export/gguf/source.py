"""The checkpoint side of a GGUF export: which directory, its config, its family, its RoPE, its tensors.

Reads a Hugging Face directory (dense or edgeprune-pruned) with safetensors only: tensors come out one at a time
as float32 numpy arrays. It knows nothing of GGUF names or llama.cpp (``layout.py`` decides those) and imports
neither torch nor transformers (torch only to read bf16 tensors, which numpy cannot hold).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.adapters.families import Family, family_for
from edgeprune.errors import EdgePruneError, first_line


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgePruneError(f"cannot read {what} {path}: {first_line(e)}") from None


def resolve_checkpoint(path: Path) -> Path:
    """A model directory; a .gguf file that edgeprune has loaded before stands for its dequantized cache (what
    ``load("default").source`` names the first time, before the cache exists)."""
    if path.is_file() and path.suffix == ".gguf":
        from edgeprune.models.loader import gguf_cache_path

        cached = gguf_cache_path(path)
        if (cached / "manifest.json").is_file():
            return cached
        raise EdgePruneError(f"{path} is a GGUF file without an edgeprune cache: load it once with edgeprune "
                             "(or pass a model directory)")
    return path


def model_config(ckpt: Path) -> tuple[dict, Family]:
    """config.json and the family it belongs to."""
    if not ckpt.is_dir() or not (ckpt / "config.json").is_file():
        raise EdgePruneError(f"{ckpt} is not a model directory (no config.json)")
    cfg = read_json(ckpt / "config.json", "model config")
    fam = family_for(str(cfg.get("model_type", "?")))
    if fam is None:
        raise EdgePruneError(f"cannot export model_type {cfg.get('model_type')!r} to GGUF (supported: "
                             f"{', '.join(_supported())} and their edgeprune_ variants)")
    act = cfg.get(fam.activation_key, fam.activation)
    if act != fam.activation:
        raise EdgePruneError(f"cannot export {fam.activation_key} {act!r} of a {fam.name} model to GGUF "
                             f"(llama.cpp's {fam.gguf_arch} uses {fam.activation})")
    return cfg, fam


def _supported() -> list[str]:
    from edgeprune.adapters.families import FAMILIES

    return [f.name for f in FAMILIES.values() if f.gguf_arch]


RopeKinds = ("default", "linear", "llama3")


def rope_parameters(cfg: dict, layer_type: str = "full_attention") -> dict:
    """RoPE settings of one attention type: ``rope_theta``, ``rope_type`` (default / linear / llama3) and the
    scaling fields. transformers 5 keeps them in ``rope_parameters``, per layer type for Gemma 3."""
    params = dict(cfg.get("rope_parameters") or {})
    if layer_type in params and isinstance(params[layer_type], dict):
        params = dict(params[layer_type])
    params = {**(cfg.get("rope_scaling") or {}), **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in RopeKinds:
        raise EdgePruneError(f"RoPE scaling {kind!r} is not supported by the GGUF exporter ({', '.join(RopeKinds)})")
    return {**params, "rope_theta": float(theta), "rope_type": kind}


def llama3_rope_factors(rope: dict, n_rot: int, cfg: dict) -> np.ndarray:
    """Per-frequency divisors for llama3 RoPE scaling (llama.cpp's rope_freqs tensor)."""
    base = rope["rope_theta"]
    factor = float(rope.get("factor", 8.0))
    lo, hi = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", 8192)))
    inv = 1.0 / base ** (np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    wavelen = 2 * math.pi / inv
    smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)  # 1 for high, factor for low frequencies


class Tensors:
    """The checkpoint's safetensors, read tensor by tensor as float32 numpy arrays."""

    def __init__(self, ckpt: Path):
        from safetensors import safe_open

        index = ckpt / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(read_json(index, "weight index")["weight_map"].values()))
        elif (ckpt / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise EdgePruneError(f"{ckpt} has no model.safetensors (only safetensors checkpoints can be exported)")
        self._where: dict[str, Any] = {}
        self._file: dict[str, str] = {}
        try:
            for name in files:
                h = safe_open(str(ckpt / name), framework="numpy")
                for key in h.keys():
                    self._where[key] = h
                    self._file[key] = str(ckpt / name)
        except Exception as e:
            raise EdgePruneError(f"cannot read weights in {ckpt}: {first_line(e)}") from None

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        try:
            arr = self._where[name].get_tensor(name)
        except TypeError:  # bf16 has no numpy dtype: read it through torch
            from safetensors import safe_open

            with safe_open(self._file[name], framework="pt") as pt:
                return pt.get_tensor(name).float().numpy()
        return np.ascontiguousarray(arr, dtype=np.float32)
