"""The per-family table: every architecture fact that is not code, in one torch-free place.

Each supported family lists its Hugging Face ``model_type`` values and classes, the HF tensor name of every role
(``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``, the norms, embeddings and head), which roles share one
fused tensor (Phi-3's ``qkv_proj``, Phi-3/GLM's ``gate_up_proj``) and in what row order, the numerical quirks an
exporter must reproduce (Gemma's ``(1 + w)`` RMSNorm and scaled embeddings, partial or interleaved RoPE, q/k
norms, sliding-window layers) and the llama.cpp GGUF architecture names. The torch adapters
(``edgeprune/adapters/``), the checkpoint's remote code and the exporters read names and quirks from here.

It does not know how a model is pruned, and it does not import torch, transformers or numpy (the device side and
the GGUF writer may read it).

Roles:

- per layer: ``q k v o`` (attention projections), ``gate up down`` (MLP projections), ``attn_norm`` (before
  attention), ``mlp_norm`` (before the MLP), ``attn_post_norm`` / ``mlp_post_norm`` (applied to the block's
  output before the residual add: Gemma 3, GLM-4), ``q_norm`` / ``k_norm`` (per-head RMSNorm of queries and keys:
  Qwen3, Gemma 3);
- per model: ``embed``, ``final_norm``, ``lm_head``.

A template names the module; the tensor is ``template + ".weight"`` or ``".bias"``; ``{i}`` is the layer index.
``lm_head.weight`` is absent from the safetensors when ``config.tie_word_embeddings`` (the embedding is the head).
Bias tensors exist only where the checkpoint has them (Qwen2/GLM q/k/v; o/down after bias compensation or the
refit). ``gguf_arch`` is the llama.cpp architecture the GGUF exporter writes for the family's uniform shapes,
``gguf_per_layer_arch`` the one for per-layer shapes (what each can represent: ``export/gguf/archs.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
NORM_ROLES = ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm", "k_norm")
LAYER_ROLES = ATTENTION_ROLES + MLP_ROLES + NORM_ROLES
MODEL_ROLES = ("embed", "final_norm", "lm_head")
LAYER_PREFIX = "model.layers.{i}."
# per-layer config lists of a checkpoint whose layers differ (read by models/remote_code.py, which keeps a copy)
LAYER_KEYS = ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size", "layer_attention_out_bias",
              "layer_mlp_out_bias")

_LLAMA_TENSORS = {
    "embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head",
    "q": "model.layers.{i}.self_attn.q_proj", "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj", "o": "model.layers.{i}.self_attn.o_proj",
    "gate": "model.layers.{i}.mlp.gate_proj", "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
    "attn_norm": "model.layers.{i}.input_layernorm", "mlp_norm": "model.layers.{i}.post_attention_layernorm",
}
_QK_NORMS = {"q_norm": "model.layers.{i}.self_attn.q_norm", "k_norm": "model.layers.{i}.self_attn.k_norm"}
_FUSED_QKV = {"q": "model.layers.{i}.self_attn.qkv_proj", "k": "model.layers.{i}.self_attn.qkv_proj",
              "v": "model.layers.{i}.self_attn.qkv_proj"}
_FUSED_GATE_UP = {"gate": "model.layers.{i}.mlp.gate_up_proj", "up": "model.layers.{i}.mlp.gate_up_proj"}


@dataclass(frozen=True)
class Family:
    """One architecture family as Hugging Face transformers 5.24 implements it."""

    name: str  # edgeprune's family name = the HF model_type written into dense checkpoints
    model_types: tuple[str, ...]  # HF model_type values this family handles
    hf_module: str  # transformers.models.<hf_module>
    config_class: str  # in transformers.models.<hf_module>.configuration_<hf_module>
    causal_lm_class: str  # in transformers.models.<hf_module>.modeling_<hf_module>
    tensors: dict[str, str]  # role -> module name template (see the module docstring)
    # fused tensors: module template -> its member roles in row order (rows split by the head layout / widths)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    activation_key: str = "hidden_act"  # config key of the MLP activation
    activation: str = "silu"  # its usual value (GeGLU families: gelu_pytorch_tanh)
    norm_offset: float = 0.0  # RMSNorm computes x_hat * (norm_offset + w): Gemma stores w - 1
    embed_scale: str = ""  # "sqrt_hidden": embeddings are multiplied by sqrt(hidden_size) (Gemma)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE
    rope_interleaved: bool = False  # RoPE rotates (x0, x1), (x2, x3) pairs (GLM) instead of the two halves
    partial_rotary: bool = False  # only the first partial_rotary_factor * head_dim dims are rotated
    # how sliding-window attention is chosen: "" none, "all" (every layer when config.sliding_window is set:
    # Mistral, Phi-3), "use_sliding_window" (Qwen2/3: the flag switches it on, config.layer_types picks the
    # layers), "layer_types" (config.layer_types says per layer: Gemma 3)
    sliding_window: str = ""
    # the HF attention module reads head counts from its config (Phi-3 splits qkv by config.num_attention_heads),
    # so a layer with its own widths needs its own config copy
    attention_reads_config_heads: bool = False
    gguf_arch: str = ""  # llama.cpp's architecture for this family (uniform shapes)
    gguf_per_layer_arch: str = ""  # llama.cpp architecture that honours per-layer widths, "" if none known
    notes: str = ""

    def template(self, role: str) -> str:
        try:
            return self.tensors[role]
        except KeyError:
            raise KeyError(f"family {self.name} has no tensor for role {role!r}") from None

    def has_role(self, role: str) -> bool:
        return role in self.tensors

    def module_path(self, role: str, layer: int | None = None) -> str:
        """Dotted module path of ``role`` in the model (layer roles need ``layer``)."""
        t = self.template(role)
        return t.format(i=layer) if "{i}" in t else t

    def layer_module_path(self, role: str) -> str:
        """Module path of a layer role relative to the decoder layer (``self_attn.q_proj``)."""
        t = self.template(role)
        if not t.startswith(LAYER_PREFIX):
            raise KeyError(f"{role!r} is not a per-layer role of family {self.name}")
        return t[len(LAYER_PREFIX):]

    def fused_members(self, role: str) -> tuple[str, ...]:
        """The roles sharing ``role``'s tensor, in row order (just ``(role,)`` when not fused)."""
        return self.fused.get(self.tensors.get(role, ""), (role,))


def _fam(**kw) -> Family:
    return Family(**kw)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _fam(name="llama", model_types=("llama",), hf_module="llama", config_class="LlamaConfig",
         causal_lm_class="LlamaForCausalLM", tensors=dict(_LLAMA_TENSORS), gguf_arch="llama",
         gguf_per_layer_arch="deci",
         notes="Llama 1-3 and SmolLM2; Llama 3's 'llama3' RoPE scaling is a rope_parameters setting, not a family"),
    _fam(name="mistral", model_types=("mistral",), hf_module="mistral", config_class="MistralConfig",
         causal_lm_class="MistralForCausalLM", tensors=dict(_LLAMA_TENSORS), sliding_window="all",
         gguf_arch="llama", gguf_per_layer_arch="deci"),
    _fam(name="qwen2", model_types=("qwen2",), hf_module="qwen2", config_class="Qwen2Config",
         causal_lm_class="Qwen2ForCausalLM", tensors=dict(_LLAMA_TENSORS), sliding_window="use_sliding_window",
         gguf_arch="qwen2", gguf_per_layer_arch="deci",
         notes="q/k/v carry biases"),
    _fam(name="qwen3", model_types=("qwen3",), hf_module="qwen3", config_class="Qwen3Config",
         causal_lm_class="Qwen3ForCausalLM", tensors={**_LLAMA_TENSORS, **_QK_NORMS}, qk_norm=True,
         sliding_window="use_sliding_window", gguf_arch="qwen3",
         notes="no q/k/v biases; per-head q/k RMSNorm over head_dim"),
    _fam(name="gemma3_text", model_types=("gemma3_text",), hf_module="gemma3", config_class="Gemma3TextConfig",
         causal_lm_class="Gemma3ForCausalLM",
         tensors={**_LLAMA_TENSORS, **_QK_NORMS,
                  "attn_post_norm": "model.layers.{i}.post_attention_layernorm",
                  "mlp_norm": "model.layers.{i}.pre_feedforward_layernorm",
                  "mlp_post_norm": "model.layers.{i}.post_feedforward_layernorm"},
         activation_key="hidden_activation", activation="gelu_pytorch_tanh", norm_offset=1.0,
         embed_scale="sqrt_hidden", qk_norm=True, sliding_window="layer_types", gguf_arch="gemma3",
         notes="four norms per layer (input, post-attention, pre- and post-feedforward); head_dim is not "
               "hidden/heads; queries scaled by query_pre_attn_scalar**-0.5; local layers use "
               "rope_local_base_freq; GeGLU MLP"),
    _fam(name="phi3", model_types=("phi3",), hf_module="phi3", config_class="Phi3Config",
         causal_lm_class="Phi3ForCausalLM", tensors={**_LLAMA_TENSORS, **_FUSED_QKV, **_FUSED_GATE_UP},
         fused={_FUSED_QKV["q"]: ("q", "k", "v"), _FUSED_GATE_UP["gate"]: ("gate", "up")},
         partial_rotary=True, sliding_window="all", attention_reads_config_heads=True, gguf_arch="phi3",
         gguf_per_layer_arch="deci",  # llama.cpp's deci rotates all of head_dim: Phi-3/3.5-mini, not Phi-4-mini
         notes="Phi-3/3.5/4-mini: fused qkv_proj (q rows, then k, then v) and gate_up_proj (gate rows, then up); "
               "Phi-4-mini rotates 3/4 of head_dim"),
    _fam(name="glm", model_types=("glm",), hf_module="glm", config_class="GlmConfig",
         causal_lm_class="GlmForCausalLM", tensors={**_LLAMA_TENSORS, **_FUSED_GATE_UP},
         fused={_FUSED_GATE_UP["gate"]: ("gate", "up")}, rope_interleaved=True, partial_rotary=True,
         gguf_arch="chatglm",
         notes="GLM-4-9B (the ChatGLM family): q/k/v biases, fused gate_up_proj, interleaved RoPE on half of "
               "head_dim"),
    _fam(name="glm4", model_types=("glm4",), hf_module="glm4", config_class="Glm4Config",
         causal_lm_class="Glm4ForCausalLM",
         tensors={**_LLAMA_TENSORS, **_FUSED_GATE_UP,
                  "attn_post_norm": "model.layers.{i}.post_self_attn_layernorm",
                  "mlp_post_norm": "model.layers.{i}.post_mlp_layernorm"},
         fused={_FUSED_GATE_UP["gate"]: ("gate", "up")}, rope_interleaved=True, partial_rotary=True,
         gguf_arch="glm4",
         notes="GLM-4-0414: as glm plus post-attention and post-MLP norms (four norms per layer)"),
)}

_BY_MODEL_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def supported() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_for(model_type: str) -> Family | None:
    """The family of an HF ``model_type`` (``edgeprune_<family>`` for per-layer checkpoints), or None."""
    base = model_type.removeprefix("edgeprune_")
    return _BY_MODEL_TYPE.get(base) or FAMILIES.get(base)


def get_family(name: str) -> Family:
    fam = family_for(name)
    if fam is None:
        from edgeprune.errors import EdgePruneError

        raise EdgePruneError(f"unsupported architecture '{name}'; supported: {', '.join(FAMILIES)}")
    return fam


def role_rows(family: Family, role: str, num_heads: int, num_kv_heads: int, head_dim: int,
              intermediate_size: int) -> slice | None:
    """Rows of ``role`` inside its fused tensor (None when the role has its own tensor)."""
    members = family.fused_members(role)
    if len(members) == 1:
        return None
    sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim,
             "gate": intermediate_size, "up": intermediate_size}
    start = 0
    for m in members:
        if m == role:
            return slice(start, start + sizes[m])
        start += sizes[m]
    raise AssertionError("unreachable")


def tensor_name(family: Family | str, role: str, layer: int | None = None, kind: str = "weight",
                num_heads: int = 0, num_kv_heads: int = 0, head_dim: int = 0,
                intermediate_size: int = 0) -> tuple[str, slice | None]:
    """(HF tensor name, row slice) of ``role`` in layer ``layer``. The slice is not None only for a role inside a
    fused tensor; computing it needs that layer's head counts, head_dim and intermediate size."""
    fam = get_family(family) if isinstance(family, str) else family
    if kind not in ("weight", "bias"):
        raise ValueError(f"kind must be 'weight' or 'bias', not {kind!r}")
    name = f"{fam.module_path(role, layer)}.{kind}"
    return name, role_rows(fam, role, num_heads, num_kv_heads, head_dim, intermediate_size)


def remote_layout(family: Family | str) -> dict:
    """What ``models/remote_code.py`` (copied into per-layer checkpoints, no edgeprune import) needs to rebuild a
    family's layers with their own widths: classes, layer-relative module paths, fused groups. Plain JSON."""
    fam = get_family(family) if isinstance(family, str) else family
    rel = {r: fam.layer_module_path(r) for r in ATTENTION_ROLES + MLP_ROLES}
    fused = {t[len(LAYER_PREFIX):]: list(m) for t, m in fam.fused.items()}
    return {"family": fam.name, "hf_module": fam.hf_module, "config_class": fam.config_class,
            "causal_lm_class": fam.causal_lm_class, "layers": LAYER_PREFIX.rsplit(".", 2)[0], "paths": rel,
            "fused": fused, "attention_reads_config_heads": fam.attention_reads_config_heads}


# GGUF general.architecture values transformers 5.24 can dequantize, by family (gemma3 files hold the text model)
_GGUF_LOADABLE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                  "gemma3": "gemma3_text", "phi3": "phi3"}


def family_for_gguf_arch(arch: str) -> Family | None:
    """The family of a GGUF file's ``general.architecture`` when transformers can load such a file, else None."""
    name = _GGUF_LOADABLE.get(arch)
    return FAMILIES[name] if name else None
