"""What an artifact is, from its files alone: its format and model file, its size, its manifest's identity and the
model's shape (KV heads per layer, head size, hidden size, vocabulary, trained context) from the GGUF header or
manifest.json / config.json. Runs on the device: standard library only.

It loads no runtime and measures nothing (``timing.py``); it does not predict memory (``memory_check.py``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

if __package__:
    from . import llama_generate
else:  # alone in a bundle, beside its sibling modules
    import llama_generate

TOKENIZER_NAMES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json", "manifest.json", "vocab.json", "merges.txt"}


class ProfileError(Exception):
    """A user-facing problem (no artifact, budget exceeded, runtime missing): one line, exit code 2."""


def artifact_format(path: Path) -> tuple[str, Path]:
    """("onnx"|"gguf", model file) of an artifact directory (or a model file)."""
    path = Path(path)
    if path.is_file():
        if path.suffix in (".onnx", ".gguf"):
            return path.suffix[1:], path
        raise ProfileError(f"{path} is neither a .onnx nor a .gguf file")
    if not path.is_dir():
        raise ProfileError(f"artifact not found: {path}")
    found = [(fmt, path / f"model.{fmt}") for fmt in ("gguf", "onnx") if (path / f"model.{fmt}").is_file()]
    if not found:
        raise ProfileError(f"{path} is not an artifact directory (no model.gguf or model.onnx)")
    return found[0]


def read_json(path: Path) -> dict:
    """The JSON document at ``path``, or {} when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def artifact_info(path: Path) -> dict:
    fmt, model = artifact_format(path)
    root = model.parent
    files = [f for f in root.rglob("*") if f.is_file()] if Path(path).is_dir() else [model]
    weights = [f for f in files if f.name not in TOKENIZER_NAMES and f.suffix not in (".txt", ".md")]
    manifest_path = root / "manifest.json"
    manifest = read_json(manifest_path)
    info = {"path": str(Path(path)), "name": root.name if Path(path).is_dir() else model.stem, "format": fmt,
            "model_file": model.name, "size_bytes": sum(f.stat().st_size for f in files),
            "model_bytes": sum(f.stat().st_size for f in weights),
            "dtype": manifest.get("dtype"), "manifest_kind": manifest.get("kind"),
            "manifest_created": manifest.get("created"), "source": manifest.get("source"),
            "manifest_sha256": None}
    if manifest_path.is_file():
        info["manifest_sha256"] = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    bundle = read_json(root.parent / "bundle.json")
    if bundle.get("id"):  # shipped: the directory is called "artifact"; keep the artifact's own name
        info["bundle_id"] = bundle["id"]
        info["name"] = bundle.get("artifact") or info["name"]
    return info


def model_shape(path: Path) -> dict:
    """Layers' KV heads, head size, hidden size, query heads, vocabulary and trained context of an artifact, from
    the GGUF header (GGUF) or manifest.json / config.json (ONNX; also ``shared_head``: the file holds the tied
    lm_head's table once). Missing values are None."""
    fmt, model = artifact_format(path)
    root = model.parent
    cfg = read_json(root / "config.json")
    man = read_json(root / "manifest.json")
    shape = {"kv_heads": None, "head_dim": None, "hidden": None, "heads": None, "vocab": None, "context": None,
             "shared_head": None}
    if fmt == "gguf":
        meta = llama_generate.gguf_metadata(model)
        arch = meta.get("general.architecture", "llama")
        n_layers = int(meta.get(f"{arch}.block_count", 0))
        kv = meta.get(f"{arch}.attention.head_count_kv")
        heads = meta.get(f"{arch}.attention.head_count")
        shape["kv_heads"] = [int(k) for k in kv] if isinstance(kv, list) else [int(kv or 0)] * n_layers
        shape["heads"] = max(heads) if isinstance(heads, list) else heads
        shape["hidden"] = meta.get(f"{arch}.embedding_length")
        shape["head_dim"] = meta.get(f"{arch}.attention.key_length") or (
            shape["hidden"] // shape["heads"] if shape["hidden"] and shape["heads"] else None)
        shape["context"] = meta.get(f"{arch}.context_length")
        tokens = meta.get("tokenizer.ggml.tokens")
        shape["vocab"] = tokens.get("array_len") if isinstance(tokens, dict) else (len(tokens) if tokens else None)
    else:
        n_layers = int(cfg.get("num_hidden_layers") or man.get("num_layers") or 0)
        kv = man.get("kv_heads") or cfg.get("layer_num_kv_heads")
        shape["kv_heads"] = [int(k) for k in kv] if kv else [int(cfg.get("num_key_value_heads") or 0)] * n_layers
        shape["heads"] = cfg.get("num_attention_heads")
        shape["hidden"] = cfg.get("hidden_size")
        shape["head_dim"] = man.get("head_dim") or cfg.get("head_dim") or (
            shape["hidden"] // shape["heads"] if shape["hidden"] and shape["heads"] else None)
        shape["context"] = cfg.get("max_position_embeddings")
        shape["vocab"] = man.get("vocab_size") or cfg.get("vocab_size")
        shape["shared_head"] = bool(man.get("shared_tied_head")
                                    or (man.get("quantization") or {}).get("shared_tied_head"))
    return shape
