"""What each llama.cpp architecture the exporter writes can represent, in the llama.cpp that llama-cpp-python
0.3.36 bundles. These are facts about llama.cpp's loaders and graphs (``src/models/<arch>.cpp``), checked by
the parity tests in tests/test_gguf_families.py; which Hugging Face family maps to which architecture is in the
family table (``edgeprune/adapters/families.py``: ``gguf_arch``, ``gguf_per_layer_arch``), and which GGUF
tensors an architecture declares comes from gguf-py (``gguf.MODEL_TENSORS``).

``fit`` says whether a checkpoint's facts fit an architecture, and if not, why (one phrase for the error).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Arch:
    name: str
    rope_neox: bool  # rotates the two halves of each head (NEOX); False: interleaved pairs (NORM)
    per_layer: bool = False  # honours per-layer head_count / head_count_kv / feed_forward_length arrays
    removed_blocks: bool = False  # runs layers with 0 heads or 0 FFN channels
    full_rotary: bool = True  # asserts rope.dimension_count == head_dim
    fused_gate_up: bool = False  # reads gate and up as one ffn_up of 2 * n_ff rows (gate rows first)
    qkv_bias: bool = False  # adds q/k/v biases
    out_biases: frozenset = field(default_factory=frozenset)  # output biases its graph adds: "o", "down"
    hidden_wide_attention: bool = False  # its attention output must be hidden_size wide (all heads kept)
    activation: str = "silu"
    embed_scale: str = ""  # "sqrt_hidden": the graph multiplies embeddings by sqrt(hidden_size) itself
    sliding_window: bool = False  # reads attention.sliding_window (+ a per-layer pattern)
    ignores_sliding_window: bool = False  # reads it but runs full attention (llama.cpp's phi3 today)


ARCHS = {a.name: a for a in (
    Arch("llama", rope_neox=False, qkv_bias=True, out_biases=frozenset({"o", "down"})),
    # per-layer Llama (llama.cpp's src/models/deci.cpp): 0 heads skips attention; 0 FFN channels skips the rest of
    # the layer, dropping its attention output, which is why the layout gives such layers a placeholder FFN
    Arch("deci", rope_neox=False, per_layer=True, removed_blocks=True, qkv_bias=True,
         out_biases=frozenset({"o", "down"})),
    Arch("qwen2", rope_neox=True, qkv_bias=True, hidden_wide_attention=True),
    Arch("qwen3", rope_neox=True),
    Arch("gemma3", rope_neox=True, activation="gelu_pytorch_tanh", embed_scale="sqrt_hidden", sliding_window=True),
    Arch("phi3", rope_neox=True, full_rotary=False, fused_gate_up=True,
         hidden_wide_attention=True, ignores_sliding_window=True),
    Arch("chatglm", rope_neox=False, full_rotary=False, fused_gate_up=True, qkv_bias=True, hidden_wide_attention=True),
    Arch("glm4", rope_neox=False, full_rotary=False, fused_gate_up=True, qkv_bias=True),
)}


def arch_tensors(arch: str) -> set[str]:
    """The GGUF tensor name templates (``blk.{bid}.attn_q``) gguf-py declares for ``arch``."""
    import gguf

    kind = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    return {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[kind]}


@dataclass(frozen=True)
class Facts:
    """What a checkpoint needs from an architecture (from its config, family and tensors)."""

    uniform: bool  # every layer the same widths, both blocks kept
    removed_blocks: bool
    full_rotary: bool
    attention_hidden_wide: bool  # every layer keeps heads * head_dim == hidden_size
    qkv_bias: bool
    out_biases: frozenset
    activation: str
    embed_scale: str
    norm_kinds: frozenset  # GGUF name templates of the family's norms
    sliding_window: bool  # some layers use sliding-window attention within the context


def fit(arch: Arch, facts: Facts) -> str | None:
    """None when ``facts`` fit ``arch``; else why not, as a phrase."""
    if not facts.uniform and not arch.per_layer:
        return f"llama.cpp's {arch.name} has one head count and FFN width for all layers"
    if facts.removed_blocks and not arch.removed_blocks:
        return f"llama.cpp's {arch.name} cannot run a layer without attention or MLP"
    if not facts.full_rotary and arch.full_rotary:
        return f"llama.cpp's {arch.name} rotates all of head_dim (this model rotates part of it)"
    if not facts.attention_hidden_wide and arch.hidden_wide_attention:
        return f"llama.cpp's {arch.name} needs every attention head (its attention output is hidden_size wide)"
    if facts.qkv_bias and not arch.qkv_bias:
        return f"llama.cpp's {arch.name} has no q/k/v biases"
    if facts.out_biases - arch.out_biases:
        missing = "/".join(sorted(facts.out_biases - arch.out_biases))
        return (f"llama.cpp's {arch.name} adds no {missing} output bias (the least-squares refit's or "
                "--bias-compensation's: prune with --no-reconstruct and without --bias-compensation to export it)")
    if facts.activation != arch.activation:
        return f"llama.cpp's {arch.name} uses {arch.activation}, the model {facts.activation}"
    if facts.embed_scale != arch.embed_scale:
        return f"llama.cpp's {arch.name} does not scale embeddings as the model does"
    missing_norms = facts.norm_kinds - arch_tensors(arch.name)
    if missing_norms:
        names = ", ".join(sorted(n.removeprefix("blk.{bid}.") for n in missing_norms))
        return f"llama.cpp's {arch.name} has no {names}"
    return None
