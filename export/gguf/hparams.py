"""The architecture's hyper-parameters (GGUF keys from ``gguf.Keys``) for a layout: widths, RoPE, norms, sliding
window. Per-layer architectures get per-layer arrays; ``key_length`` / ``value_length`` / ``rope.dimension_count``
are always written, since llama.cpp otherwise derives the head size as hidden_size / (layer 0's head count).

Sliding-window attention: an architecture that reads it (gemma3) gets the window and which layers use it; one
that does not (llama, deci, phi3 in this llama.cpp) gets ``context_length`` capped at the window, the longest
context over which it computes what the model computes.
"""

from __future__ import annotations

from typing import Any

import gguf
from edgeprune.export.gguf.source import rope_parameters

from edgeprune.adapters.families import Family
from edgeprune.errors import EdgePruneError


def _sliding_layers(cfg: dict, fam: Family) -> list[bool]:
    """Per Hugging Face layer: does it use sliding-window attention."""
    n, window = int(cfg["num_hidden_layers"]), cfg.get("sliding_window")
    types = cfg.get("layer_types") or ["full_attention"] * n
    if not window or fam.sliding_window == "":
        return [False] * n
    if fam.sliding_window == "all":
        return [True] * n
    if fam.sliding_window == "use_sliding_window" and not cfg.get("use_sliding_window"):
        return [False] * n
    return [t == "sliding_attention" for t in types]


def hyperparameters(cfg: dict, fam: Family, arch, layout) -> dict[str, Any]:
    K, a, layers = gguf.Keys, arch.name, layout.layers

    def key(k: str) -> str:
        return k.format(arch=a)

    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(cap):
            raise EdgePruneError(f"{cap} is not supported by the GGUF exporter")
    per_layer = arch.per_layer
    kv: dict[str, Any] = {
        key(K.LLM.CONTEXT_LENGTH): int(cfg.get("max_position_embeddings", 2048)),
        key(K.LLM.EMBEDDING_LENGTH): layout.hidden,
        key(K.LLM.BLOCK_COUNT): len(layers),
        key(K.LLM.FEED_FORWARD_LENGTH): [x.ffn for x in layers] if per_layer else layers[0].ffn,
        key(K.Attention.HEAD_COUNT): [x.heads for x in layers] if per_layer else layers[0].heads,
        key(K.Attention.HEAD_COUNT_KV): [x.kv_heads for x in layers] if per_layer else layers[0].kv_heads,
        key(K.Attention.KEY_LENGTH): layout.head_dim,
        key(K.Attention.VALUE_LENGTH): layout.head_dim,
        key(K.Rope.DIMENSION_COUNT): layout.n_rot,
        key(K.Rope.FREQ_BASE): float(layout.rope["rope_theta"]),
        key(K.Attention.LAYERNORM_RMS_EPS): float(cfg.get("rms_norm_eps", 1e-6)),
        key(K.LLM.VOCAB_SIZE): layout.n_vocab,
    }
    if layout.rope["rope_type"] == "linear":
        kv[key(K.Rope.SCALING_TYPE)] = "linear"
        kv[key(K.Rope.SCALING_FACTOR)] = float(layout.rope["factor"])
    sliding = _sliding_layers(cfg, fam)
    window = int(cfg.get("sliding_window") or 0)
    ctx = kv[key(K.LLM.CONTEXT_LENGTH)]
    if arch.sliding_window and not arch.ignores_sliding_window:
        kv[key(K.Attention.SLIDING_WINDOW)] = window or ctx
        kv[key(K.Attention.SLIDING_WINDOW_PATTERN)] = [sliding[x.src] for x in layers]
        kv[key(K.Rope.FREQ_BASE_SWA)] = float(rope_parameters(cfg, "sliding_attention")["rope_theta"])
    elif any(sliding) and window < ctx:
        kv[key(K.LLM.CONTEXT_LENGTH)] = window
        layout.notes.append(f"context_length capped at the sliding window ({window}): llama.cpp's {a} "
                            "runs full attention")
    return kv
