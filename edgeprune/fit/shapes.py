"""Model shapes without weights: what a checkpoint's config says (per-layer heads, KV heads, MLP width), the
shape a pruning ratio leads to, and the bytes each exported format and dtype spends on each tensor.

This is what ``edgeprune fit`` predicts from before any model is pruned or exported: the memory check
(``memory.py``) and the latency model (``latency.py``) both read a ``ModelShape``. Imports no torch.

Does NOT know which units a scorer keeps, nor the exact per-layer split an allocator chooses: ``at_ratio``
spreads the removed parameters evenly over layers (the totals, which size and speed follow, match any
allocator that meets the same budget).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgeprune.allocation.base import UnitCosts, check_ratio, integerize, priced, solve_ratios
from edgeprune.errors import EdgePruneError

# Bytes per weight of each GGML block type (gguf's GGML_QUANT_SIZES: block bytes / block size) and its block.
GGML = {"F32": (4.0, 1), "F16": (2.0, 1), "Q8_0": (34 / 32, 32), "Q5_0": (22 / 32, 32), "Q5_1": (24 / 32, 32),
        "Q4_K": (144 / 256, 256), "Q6_K": (210 / 256, 256)}
# llama.cpp falls back to these when a row is not a multiple of the K-quant block (llama-quant.cpp)
K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_k_m")
ONNX_DTYPES = ("fp32", "fp16", "int8")
NBITS_BLOCK = 32  # export/onnx.py: MatMulNBits and GatherBlockQuantized blocks (8-bit weights, fp32 scales)
GGUF_HEADER_BYTES = 4096  # fixed keys and tensor infos, roughly; the tokenizer is counted separately
ONNX_LAYER_GRAPH_BYTES = 46_000  # nodes, names and shapes of one decoder layer in the ONNX graph (measured)


@dataclass(frozen=True)
class LayerShape:
    heads: int
    kv_heads: int
    ffn: int


@dataclass
class ModelShape:
    """A decoder-only Llama-family model's sizes. ``tokenizer_bytes``: what the vocabulary and merges take in a
    GGUF header (strings plus their length prefixes)."""

    hidden: int
    head_dim: int
    vocab: int
    context: int
    layers: list[LayerShape]
    tied: bool = True
    qkv_bias: bool = False
    tokenizer_bytes: int = 0
    name: str = "model"
    meta: dict = field(default_factory=dict)

    @property
    def heads(self) -> int:
        return max((L.heads for L in self.layers), default=0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        return cls(**{**d, "layers": [LayerShape(**x) for x in d["layers"]]})

    def profiler_shape(self) -> dict:
        """The dict ``devices.profiler.model_shape`` reads from an artifact, for the same model."""
        return {"kv_heads": [L.kv_heads for L in self.layers], "head_dim": self.head_dim, "hidden": self.hidden,
                "heads": self.heads, "vocab": self.vocab, "context": self.context,
                "shared_head": self.tied}  # what an ONNX export of it records (one table for a tied head)

    def params(self) -> dict:
        """Parameter counts by part (attention, mlp, norms, embeddings, lm_head)."""
        d, h = self.head_dim, self.hidden
        attn = sum(2 * L.heads * d * h + 2 * L.kv_heads * d * h
                   + (L.heads * d + 2 * L.kv_heads * d if self.qkv_bias else 0) for L in self.layers)
        mlp = sum(3 * L.ffn * h for L in self.layers)
        norms = (2 * len(self.layers) + 1) * h
        emb = self.vocab * h
        return {"attention": attn, "mlp": mlp, "norms": norms, "embeddings": emb, "lm_head": 0 if self.tied else emb,
                "decoder_layers": attn + mlp + (2 * len(self.layers)) * h,
                "total": attn + mlp + norms + emb + (0 if self.tied else emb)}


def from_checkpoint(ckpt: Path) -> ModelShape:
    """The shape of a Hugging Face checkpoint directory (dense, or an edgeprune checkpoint with per-layer lists)."""
    ckpt = Path(ckpt)
    try:
        cfg = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise EdgePruneError(f"cannot read {ckpt / 'config.json'}: {e}") from None
    n = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    heads0 = int(cfg.get("num_attention_heads") or 0)
    heads = cfg.get("layer_num_heads") or [heads0] * n
    kvs = cfg.get("layer_num_kv_heads") or [int(cfg.get("num_key_value_heads") or heads0)] * n
    ffs = cfg.get("layer_intermediate_size") or [int(cfg["intermediate_size"])] * n
    return ModelShape(hidden=hidden, head_dim=int(cfg.get("head_dim") or hidden // heads0),
                      vocab=int(cfg["vocab_size"]), context=int(cfg.get("max_position_embeddings") or 2048),
                      layers=[LayerShape(int(a), int(b), int(c)) for a, b, c in zip(heads, kvs, ffs, strict=True)],
                      tied=bool(cfg.get("tie_word_embeddings", True)),
                      qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
                      tokenizer_bytes=tokenizer_bytes(ckpt), name=ckpt.name)


def tokenizer_bytes(ckpt: Path) -> int:
    """Bytes the tokenizer takes in a GGUF header: each token and merge string with its 8-byte length, a 4-byte
    type per token. 0 when there is no tokenizer.json."""
    try:
        model = json.loads((Path(ckpt) / "tokenizer.json").read_text()).get("model") or {}
    except (OSError, ValueError):
        return 0
    tokens = model.get("vocab") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return (sum(len(t.encode()) + 12 for t in tokens) + sum(len(m.encode()) + 8 for m in merges))


def unit_costs(shape: ModelShape) -> list[UnitCosts]:
    """The allocators' per-layer unit costs (KV-group attention units, MLP channels) from shapes alone."""
    d, h, b = shape.head_dim, shape.hidden, int(shape.qkv_bias)
    out = []
    for i, L in enumerate(shape.layers):
        g = L.heads // L.kv_heads if L.kv_heads else 0
        group = g * (2 * d * h + b * d) + 2 * d * h + 2 * b * d
        out.append(UnitCosts(i, L.kv_heads, group, L.ffn, 3 * h, 2 * h))
    return out


def at_ratio(shape: ModelShape, ratio: float, round_to: int = 1, unit_cost=None) -> ModelShape:
    """The shape after removing ``ratio`` of the decoder layers' prunable parameters (of their ``unit_cost``:
    per layer [KV group, MLP channel], a latency budget), spread evenly (whole KV groups rounded across layers,
    MLP channels absorb the rest), as the allocators' budget does."""
    check_ratio(ratio)
    if ratio == 0:
        return replace(shape, layers=list(shape.layers))
    plain = unit_costs(shape)
    costs = priced(plain, unit_cost)
    budget = ratio * sum(c.prunable for c in costs)
    attn_r, mlp_r = [ratio] * len(costs), [ratio] * len(costs)
    if unit_cost is not None:  # LSPS with equal sensitivities: modules lose in proportion to cost per parameter
        mods, dens, hi = [], [], []
        for c, c0 in zip(costs, plain, strict=True):
            for n, u, u0 in ((c.attn_units, c.attn_unit_params, c0.attn_unit_params),
                             (c.channels, c.channel_params, c0.channel_params)):
                mods.append(n * u)
                dens.append(u / u0 if u0 else 0.0)
                hi.append(min(0.8, (n - 1) / n) if n else 0.0)
        mean = sum(dens) / len(dens) or 1.0
        r = solve_ratios([d / mean for d in dens], mods, budget, 0.0, hi)
        attn_r, mlp_r = r[0::2], r[1::2]
    alloc = integerize(costs, attn_r, mlp_r, budget, "group", round_to)
    layers = []
    for L, a in zip(shape.layers, alloc.layers, strict=True):
        g = L.heads // L.kv_heads if L.kv_heads else 0
        kv = L.kv_heads - a.attn_units
        layers.append(LayerShape(kv * g, kv, L.ffn - a.channels))
    return replace(shape, layers=layers, meta={**shape.meta, "ratio": ratio})


# ---- bytes of an exported file ---------------------------------------------------------------------------------
def _ggml_bytes(n_rows: int, n_cols: int, kind: str) -> float:
    per, block = GGML[kind]
    if n_cols % block:
        kind = K_FALLBACK.get(kind, "F16")
        per, block = GGML[kind]
        if n_cols % block:
            per = GGML["F16"][0]
    return n_rows * n_cols * per


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _gguf_matrix_kind(dtype: str, role: str, i: int, n: int) -> str:
    if dtype == "f32":
        return "F32"
    if dtype == "f16":
        return "F16"
    if dtype == "q8_0":
        return "Q8_0"
    # q4_k_m (llama_tensor_get_type): Q6_K for the output (the tied embedding stands for it) and for attn_v and
    # ffn_down in the layers use_more_bits picks; Q4_K everywhere else
    if role == "output" or (role in ("attn_v", "ffn_down") and _more_bits(i, n)):
        return "Q6_K"
    return "Q4_K"


def _gguf_parts(shape: ModelShape, dtype: str) -> dict:
    if dtype not in GGUF_DTYPES:
        raise EdgePruneError(f"unknown GGUF dtype '{dtype}'; choose from {', '.join(GGUF_DTYPES)}")
    h, d, n = shape.hidden, shape.head_dim, len(shape.layers)
    fixed = GGUF_HEADER_BYTES + shape.tokenizer_bytes + 4 * h  # output norm
    emb_role = "output" if shape.tied else "token_embd"
    fixed += _ggml_bytes(shape.vocab, h, _gguf_matrix_kind(dtype, emb_role, 0, n))
    if not shape.tied:
        fixed += _ggml_bytes(shape.vocab, h, _gguf_matrix_kind(dtype, "output", 0, n))
    attn, mlp = [], []
    for i, L in enumerate(shape.layers):
        a = sum(_ggml_bytes(r, c, _gguf_matrix_kind(dtype, role, i, n)) for role, r, c in (
            ("attn_q", L.heads * d, h), ("attn_k", L.kv_heads * d, h), ("attn_v", L.kv_heads * d, h),
            ("attn_output", h, L.heads * d)) if r and c)
        m = sum(_ggml_bytes(r, c, _gguf_matrix_kind(dtype, role, i, n)) for role, r, c in (
            ("ffn_gate", L.ffn, h), ("ffn_up", L.ffn, h), ("ffn_down", h, L.ffn)) if r and c)
        attn.append(a + 4 * h + (4 * (L.heads + 2 * L.kv_heads) * d if shape.qkv_bias else 0))
        mlp.append(m + 4 * h)
    return {"fixed": fixed, "attention": attn, "mlp": mlp}


def _onnx_parts(shape: ModelShape, dtype: str) -> dict:
    if dtype not in ONNX_DTYPES:
        raise EdgePruneError(f"unknown ONNX dtype '{dtype}'; choose from {', '.join(ONNX_DTYPES)}")
    h, d = shape.hidden, shape.head_dim

    def mat(k: int, nn: int) -> float:  # K x N weight of a MatMul
        if dtype == "int8":
            return nn * -(-k // NBITS_BLOCK) * (NBITS_BLOCK + 4)
        return k * nn * (2 if dtype == "fp16" else 4)

    attn, mlp = [], []
    for L in shape.layers:
        attn.append(mat(h, L.heads * d) + 2 * mat(h, L.kv_heads * d) + mat(L.heads * d, h) + 4 * h
                    + (4 * (L.heads + 2 * L.kv_heads) * d if shape.qkv_bias else 0))
        mlp.append(2 * mat(h, L.ffn) + mat(L.ffn, h) + 4 * h)
    graph = ONNX_LAYER_GRAPH_BYTES * len(shape.layers)
    # the embedding, and the lm_head's own (transposed) table unless they are tied (then the file holds one)
    tables = 1 if shape.tied else 2
    return {"fixed": mat(h, shape.vocab) * tables + 4 * h + graph, "attention": attn, "mlp": mlp}


GGUF_NAMES = {"int8": "q8_0", "fp32": "f32", "fp16": "f16"}


def part_bytes(shape: ModelShape, fmt: str, dtype: str) -> dict:
    """Bytes of the exported model file by part: ``fixed`` (embedding, lm_head, final norm, GGUF header and
    tokenizer), and per layer ``attention`` (q/k/v/o, input norm) and ``mlp`` (gate/up/down, post norm).

    GGUF as edgeprune's exporter writes it (matrices in ``dtype``, vectors f32, q4_k_m with llama.cpp's
    per-tensor choices and fallbacks). ONNX: one table for a tied embedding and lm_head (a Transpose node in
    float, one int8 table read by both ops in int8); int8 is MatMulNBits / GatherBlockQuantized, one byte per
    weight plus an fp32 scale per block of 32 along K."""
    if fmt == "gguf":
        return _gguf_parts(shape, GGUF_NAMES.get(dtype, dtype))
    if fmt == "onnx":
        return _onnx_parts(shape, dtype)
    raise EdgePruneError(f"unknown format '{fmt}'; choose from gguf, onnx")


def file_bytes(shape: ModelShape, fmt: str, dtype: str) -> float:
    """Predicted size of the model file (``model.gguf`` / ``model.onnx``)."""
    p = part_bytes(shape, fmt, dtype)
    return p["fixed"] + sum(p["attention"]) + sum(p["mlp"])
