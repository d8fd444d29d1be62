"""Pruned checkpoints: Hugging Face-style directories that plain transformers loads.

- Every layer the same shape: a normal config of the base family (fewer heads / channels / layers), loadable
  with ``AutoModelForCausalLM.from_pretrained(dir)`` and no extra code.
- Per-layer shapes: the config gets per-layer lists and an ``auto_map`` to ``modeling_edgeprune.py`` written
  into the directory (``models/remote_code.py`` with the family's layout filled in), loadable with
  ``trust_remote_code=True``. No pickled modules anywhere: weights are safetensors.

It knows the on-disk format, not how the model was pruned nor any family's module names (the family table
supplies them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from edgeprune.adapters.base import is_uniform
from edgeprune.adapters.families import LAYER_KEYS, remote_layout
from edgeprune.io import MANIFEST, atomic_dir, manifest, write_json

REMOTE_FILE = "modeling_edgeprune.py"


def plain_config_ok(adapter, cfg: dict) -> bool:
    if not is_uniform(adapter.shapes()):
        return False
    if any(cfg.get("layer_attention_out_bias") or []) or any(cfg.get("layer_mlp_out_bias") or []):
        return False
    # the base config must accept these widths (transformers checks hidden_size % num_heads)
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(adapter.family, **{k: v for k, v in cfg.items() if k not in LAYER_KEYS
                                                and k not in ("model_type", "architectures", "auto_map")})
    except Exception:
        return False
    return True


def remote_code_source(family: str) -> str:
    """``models/remote_code.py`` with FAMILY and LAYOUT set for ``family``."""
    src = (Path(__file__).parent / "models" / "remote_code.py").read_text()
    src = src.replace('FAMILY = "llama"', f'FAMILY = "{family}"', 1)
    src, n = re.subn(r"^LAYOUT = .*$", lambda _m: f"LAYOUT = {remote_layout(family)!r}  # noqa: E501", src,
                     count=1, flags=re.M)
    if n != 1:
        raise AssertionError("remote_code.py has no LAYOUT line")
    return src


def finish_config(adapter, directory: Path) -> str:
    """Rewrite ``directory/config.json`` (as ``save_pretrained`` wrote it) into a checkpoint's config: the base
    family's plain config when every layer has the same widths, else per-layer lists plus ``modeling_edgeprune.py``.
    Returns the layout ("uniform" or "per-layer")."""
    from edgeprune.adapters.families import get_family

    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    base = adapter.family
    if plain_config_ok(adapter, cfg):
        for k in LAYER_KEYS:
            cfg.pop(k, None)
        cfg["model_type"] = base
        cfg.pop("auto_map", None)
        cfg["architectures"] = [get_family(base).causal_lm_class]
        layout = "uniform"
    else:
        cfg["model_type"] = f"edgeprune_{base}"
        cfg["architectures"] = ["EdgePruneForCausalLM"]
        cfg["auto_map"] = {"AutoConfig": "modeling_edgeprune.EdgePruneConfig",
                           "AutoModelForCausalLM": "modeling_edgeprune.EdgePruneForCausalLM"}
        (directory / REMOTE_FILE).write_text(remote_code_source(base))
        layout = "per-layer"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return layout


def save_checkpoint(lm, out_dir: str | Path, fields: dict) -> Path:
    """Write model, tokenizer and manifest to ``out_dir`` atomically. Returns the directory."""
    adapter = lm.adapter
    adapter.sync_config()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        layout = finish_config(adapter, tmp)
        write_json(tmp / MANIFEST, manifest("pruned-checkpoint", layout=layout, **fields))
    return out_dir
