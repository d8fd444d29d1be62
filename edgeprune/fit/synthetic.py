"""Synthetic artifacts for the latency table: random weights in a given shape (the model's hidden size, head
size, vocabulary and tokenizer; chosen layer counts, heads, KV heads and MLP widths), written through
edgeprune's own exporters so that they have exactly the layout a pruned model's artifact has (GGUF ``llama`` or
``deci``; ONNX with per-layer KV shapes).

Timing does not depend on the weights' values, so no real weights are needed. Does NOT check parity (the
weights mean nothing) and does not profile (``latency.py`` does).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgePruneError
from edgeprune.fit.shapes import LayerShape, ModelShape, at_ratio

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _round(x: float, multiple: int = 32) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def probe_shapes(base: ModelShape, seed: int = 0) -> list[tuple[str, ModelShape, bool]]:
    """(name, shape, held out) of the probes: uniform shapes that vary depth, KV groups and MLP width (the
    training set), and per-layer shapes the fit never sees (held out)."""
    n = len(base.layers)
    kv = max(L.kv_heads for L in base.layers)
    g = max(L.heads for L in base.layers) // kv
    ff = max(L.ffn for L in base.layers)

    def uni(layers: int, k: int, f: int) -> ModelShape:
        return ModelShape(base.hidden, base.head_dim, base.vocab, base.context,
                          [LayerShape(k * g, k, f)] * max(1, layers), base.tied, base.qkv_bias,
                          base.tokenizer_bytes, "synthetic")

    k23 = max(1, round(2 * kv / 3))
    train = [(f"L{max(1, n // 4)}-full", uni(n // 4, kv, ff)), (f"L{max(1, n // 2)}-full", uni(n // 2, kv, ff)),
             (f"L{n}-full", uni(n, kv, ff)), (f"L{n // 2}-kv1", uni(n // 2, 1, ff)),
             (f"L{n // 2}-mlp25", uni(n // 2, kv, _round(ff / 4))),
             (f"L{n}-kv1-mlp50", uni(n, 1, _round(ff / 2))),
             (f"L{n}-kv{k23}-mlp75", uni(n, k23, _round(3 * ff / 4)))]
    rng = np.random.default_rng(seed)

    def mixed(layers: int) -> ModelShape:
        s = uni(layers, kv, ff)
        s.layers = [LayerShape(int(k) * g, int(k), _round(float(f)))
                    for k, f in zip(rng.integers(1, kv + 1, layers), rng.uniform(ff / 5, ff, layers), strict=True)]
        return s

    dense = uni(n, kv, ff)
    held = [(f"L{n}-mixed", mixed(n)), (f"L{max(1, 2 * n // 3)}-mixed", mixed(max(1, 2 * n // 3))),
            ("uniform-40", at_ratio(dense, 0.4, 32))]
    return [(name, s, False) for name, s in train] + [(name, s, True) for name, s in held]


def write_checkpoint(shape: ModelShape, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A Hugging Face Llama checkpoint with random float16 weights in ``shape`` (per-layer lists in the config
    when the layers differ, as edgeprune's checkpoints have) and the tokenizer of ``tokenizer_dir``."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, d = shape.hidden, shape.head_dim

    def rand(*s):
        return (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)

    t = {"model.embed_tokens.weight": rand(shape.vocab, h), "model.norm.weight": np.ones(h, np.float16)}
    if not shape.tied:
        t["lm_head.weight"] = rand(shape.vocab, h)
    for i, L in enumerate(shape.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(h, np.float16)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, np.float16)
        for name, rows, cols in (("self_attn.q_proj", L.heads * d, h), ("self_attn.k_proj", L.kv_heads * d, h),
                                 ("self_attn.v_proj", L.kv_heads * d, h), ("self_attn.o_proj", h, L.heads * d),
                                 ("mlp.gate_proj", L.ffn, h), ("mlp.up_proj", L.ffn, h), ("mlp.down_proj", h, L.ffn)):
            t[f"{p}{name}.weight"] = rand(rows, cols)
    save_file(t, str(out / "model.safetensors"))
    uniform = len(set(shape.layers)) == 1
    L0 = shape.layers[0]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama" if uniform else "edgeprune_llama",
           "hidden_size": h, "head_dim": d, "num_hidden_layers": len(shape.layers), "num_attention_heads": L0.heads,
           "num_key_value_heads": L0.kv_heads, "intermediate_size": L0.ffn, "vocab_size": shape.vocab,
           "max_position_embeddings": shape.context, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "hidden_act": "silu", "tie_word_embeddings": shape.tied, "torch_dtype": "float16"}
    if not uniform:
        cfg.update(layer_num_heads=[L.heads for L in shape.layers],
                   layer_num_kv_heads=[L.kv_heads for L in shape.layers],
                   layer_intermediate_size=[L.ffn for L in shape.layers])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, out / name)
    return out


def build_artifact(shape: ModelShape, tokenizer_dir: Path, fmt: str, dtype: str, out: Path, seed: int = 0) -> Path:
    """An artifact directory (model file, tokenizer, config, manifest) of random weights in ``shape``."""
    from edgeprune.io import MANIFEST, manifest, write_json

    ckpt = write_checkpoint(shape, tokenizer_dir, out / "checkpoint", seed)
    art = out / "artifact"
    if fmt == "onnx":  # the exporter writes the whole artifact directory; no parity check on random weights
        from edgeprune.export.onnx import export_onnx

        export_onnx(ckpt, art, dtype, False, check=False)
    elif fmt == "gguf":
        from edgeprune.export.gguf import export_gguf

        art.mkdir(parents=True, exist_ok=True)
        info = export_gguf(ckpt, art / "model.gguf", dtype, pre_tokenizer="gpt-2")
        for name in (*TOKENIZER_FILES, "config.json"):
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, art / name)
        write_json(art / MANIFEST, manifest("synthetic", format=fmt, dtype=dtype, shape=shape.to_dict(),
                                            size_bytes=info.get("size_bytes")))
    else:
        raise EdgePruneError(f"unknown format '{fmt}'")
    shutil.rmtree(ckpt, ignore_errors=True)
    return art
