"""GGUF export of (pruned) Llama-family checkpoints for llama.cpp, and parity checks against PyTorch.

Layout
------
- Every layer the same shape (none removed): arch ``llama`` with scalar hyper-parameters.
- Anything else: arch ``deci`` (llama.cpp's per-layer Llama variant, ``src/models/deci.cpp``) with per-layer
  arrays ``deci.attention.head_count`` / ``head_count_kv`` / ``feed_forward_length``. Both write
  ``attention.key_length`` / ``value_length`` and ``rope.dimension_count`` = head_dim, since llama.cpp
  otherwise derives the head size as hidden_size / (layer 0's head count).

Removed blocks in deci (llama.cpp's deci loader and graph, checked against the bundled build):
- attention removed (0 heads): ``head_count = head_count_kv = 0`` and no attention tensors; the graph skips the
  block and has no bias for it, so the block's constant output (``self_attn.bias``, from bias compensation)
  is folded backward into the output bias of the previous block that exists (a constant added to the residual
  commutes with absent blocks). Exact.
- llama.cpp reads ``key_length`` only when layer 0 has heads (``llama_model::load_hparams``:
  ``if (hparams.n_head() > 0)``, else the head size is 0 and loading fails), so when the first written layer
  has no attention (or constants precede every block) a zero layer goes in front: 1 head with zero weights,
  a zero placeholder FFN, and biases that carry those constants. Exact.
- MLP removed (0 channels) in a layer that keeps attention: the deci graph's ``n_ff == 0`` branch
  ``continue``s before ``inpL = cur``, dropping the layer's attention output (measured: logits off by 3 on a
  tiny model; as the last layer it aborts in llama_decode). Such a layer gets a placeholder FFN of
  ``PLACEHOLDER_FFN`` zero channels (silu(0) * 0 = 0) whose ``ffn_down.bias`` carries the constant. Exact.
- both removed: the layer is an identity (plus constants, folded as above) and is left out.
- ``o_proj`` / ``down_proj`` biases are written as ``blk.N.attn_output.bias`` / ``blk.N.ffn_down.bias``: the
  llama and deci loaders take them as optional ``wo_b`` / ``ffn_down_b`` and both graphs add them.

Q/K rows (and Qwen2's q/k biases) are permuted from Hugging Face's rotate-half layout to the interleaved pairs
of llama.cpp's "normal" RoPE used by llama/deci, so Mistral and Qwen2 are written as llama/deci too.

Nothing here imports torch at module level; ``export_gguf`` needs numpy, safetensors and gguf only (torch only
for bf16 checkpoints); ``check_gguf`` needs torch/transformers and llama-cpp-python.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgeprune.devices.llama_generate import _no_extra_buffer_types

from edgeprune.errors import EdgePruneError, first_line
from edgeprune.io import check_writable_parent, sha256_file

GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_k_m")
FAMILIES = ("llama", "mistral", "qwen2")
PLACEHOLDER_FFN = 32

# Parity tolerances on max |logit difference| vs. PyTorch fp32 over every prompt position and vocabulary entry
# (same token ids, f32 KV cache in llama.cpp), and on top-1 agreement. Measured on SmolLM2-135M (logits up to
# ~30): f32 5e-5 (dense) / 3e-4 (deci), f16 0.035, q8_0 1.26 (top-1 0.97), q4_k_m 7.2 (top-1 0.86; 180 of 272
# tensors fall back to q5_0/q8_0 because 576 is not a multiple of 256); tiny random models: f32 1e-6,
# f16 2e-3, q8_0 0.045, q4_k_m 0.19.
TOLERANCE = {"f32": 1e-2, "f16": 0.15, "q8_0": 8.0, "q4_k_m": 25.0}
# 4-bit files are judged on the mean KL(PyTorch || llama.cpp) over the prompts' positions: their max |logit diff|
# is one position's outlier (a pruned SmolLM2 at 30% gave 12.5 at a single position, KL 0.48 there and <= 0.07
# everywhere else, with top-1 agreement 1.0 and PPL +2.5%); the max bound above is only a gross sanity check.
# Measured mean KL of Q4_K_M on the check prompts: dense SmolLM2 0.12 (PPL +7%), that pruned model 0.05.
MAX_MEAN_KL = {"q4_k_m": 0.25, "q8_0": 0.05}
# q8_0 is judged on the mean KL too (its max bound above is a gross check): pruned SmolLM2 without distillation
# (20-50 %, least-squares refit) gave max |logit diff| 2.4-4.5 at single positions with mean KL 0.008-0.012 and
# top-1 agreement 0.90-1.0 (edgeprune fit's benchmark); the dense model: 1.26, KL well under 0.01.
# Quantized files must also agree on the top-1 token this often; f32/f16 must instead give the same greedy tokens
# (within the logit tolerance every top-1 flip is a near-tie: the reference's gap is at most 2x the tolerance).
MIN_TOP1 = {"q8_0": 0.85, "q4_k_m": 0.75}

_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama_ftype
_FILE_TYPE_NAME = {v: k for k, v in _FILE_TYPE.items()}

# pre-tokenizer regexes of known Hugging Face tokenizers -> llama.cpp's tokenizer.ggml.pre name
_SPLIT_REGEX_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "def fibonacci(n):\n    ",
    "Water boils at a temperature of",
)


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class _LayerShape:
    src: int  # Hugging Face layer index
    heads: int
    kv_heads: int
    ffn: int  # in the GGUF (a placeholder width where the MLP was removed)
    hf_ffn: int


class _Tensors:
    """The checkpoint's safetensors, read tensor by tensor as float32 numpy arrays."""

    def __init__(self, ckpt: Path):
        from safetensors import safe_open

        index = ckpt / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (ckpt / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise EdgePruneError(f"{ckpt} has no model.safetensors (only safetensors checkpoints can be exported)")
        self._where: dict[str, Any] = {}
        self._file: dict[str, str] = {}
        self._handles = []
        try:
            for name in files:
                h = safe_open(str(ckpt / name), framework="numpy")
                self._handles.append(h)
                for key in h.keys():
                    self._where[key] = h
                    self._file[key] = str(ckpt / name)
        except EdgePruneError:
            raise
        except Exception as e:
            raise EdgePruneError(f"cannot read weights in {ckpt}: {first_line(e)}") from None

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        h = self._where[name]
        try:
            arr = h.get_tensor(name)
        except TypeError:  # bf16 has no numpy dtype: read it through torch
            from safetensors import safe_open

            with safe_open(self._file[name], framework="pt") as pt:
                return pt.get_tensor(name).float().numpy()
        return np.ascontiguousarray(arr, dtype=np.float32)




def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgePruneError(f"cannot read {what} {path}: {first_line(e)}") from None


def _resolve_checkpoint(path: Path) -> Path:
    """A model directory; a .gguf file that edgeprune has loaded before stands for its dequantized cache (what
    ``load("default").source`` names the first time, before the cache exists)."""
    if path.is_file() and path.suffix == ".gguf":
        from edgeprune.models.loader import _gguf_cache_path

        cached = _gguf_cache_path(path)
        if (cached / "manifest.json").is_file():
            return cached
        raise EdgePruneError(f"{path} is a GGUF file without an edgeprune cache: load it once with edgeprune "
                             "(or pass a model directory)")
    return path


def _model_config(ckpt: Path) -> dict:
    if not ckpt.is_dir():
        raise EdgePruneError(f"{ckpt} is not a model directory")
    if not (ckpt / "config.json").is_file():
        raise EdgePruneError(f"{ckpt} is not a model directory (no config.json)")
    cfg = _read_json(ckpt / "config.json", "model config")
    family = str(cfg.get("model_type", "?")).removeprefix("edgeprune_")
    if family not in FAMILIES:
        raise EdgePruneError(f"cannot export model_type {cfg.get('model_type')!r} to GGUF "
                             f"(supported: {', '.join(FAMILIES)} and their edgeprune_ variants)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise EdgePruneError(f"cannot export hidden_act {cfg.get('hidden_act')!r} to GGUF (llama/deci use silu)")
    cfg["_family"] = family
    return cfg


def _rope(cfg: dict) -> dict:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise EdgePruneError(f"RoPE scaling {kind!r} is not supported by the GGUF exporter (default, linear, llama3)")
    return {**params, "rope_theta": float(theta), "rope_type": kind}


def _llama3_rope_factors(rope: dict, head_dim: int, cfg: dict) -> np.ndarray:
    """Per-frequency divisors for llama3 RoPE scaling (llama.cpp's rope_freqs tensor)."""
    base = rope["rope_theta"]
    factor = float(rope.get("factor", 8.0))
    lo, hi = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", 8192)))
    inv = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
    out = 1.0 / ((1 - smooth) / factor + smooth)  # 1 for high, factor for low frequencies
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------- tokenizer


def _tokenizer(ckpt: Path, cfg: dict, n_vocab: int, pre_override: str | None) -> dict:
    """Everything tokenizer.ggml.* needs, from tokenizer.json / tokenizer_config.json."""
    tj_path = ckpt / "tokenizer.json"
    if not tj_path.is_file():
        raise EdgePruneError(f"{ckpt} has no tokenizer.json (a fast BPE tokenizer is needed for GGUF)")
    tj = _read_json(tj_path, "tokenizer")
    tcfg = _read_json(ckpt / "tokenizer_config.json", "tokenizer config") \
        if (ckpt / "tokenizer_config.json").is_file() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise EdgePruneError("only byte-level BPE tokenizers (GPT-2 style) can be written to GGUF by edgeprune")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    by_id: dict[int, str] = {i: s for s, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise EdgePruneError(f"tokenizer has token id {max(by_id)} but the embedding only {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif s in added:
            tokens.append(s)
            types.append(3 if added[s].get("special") else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(s)
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        # llama.cpp requires the key and gguf-py refuses empty arrays: a merge of two multi-character
        # control tokens never applies (BPE starts from single characters and there is no other merge).
        ctrl = [s for s, t in added.items() if t.get("special") and len(s) > 1 and " " not in s]
        if not ctrl:
            raise EdgePruneError("tokenizer has no merges and no special token to write a no-op merge with")
        merges = [f"{ctrl[0]} {ctrl[-1]}"]
    pre, pre_source = _pre_tokenizer(ckpt, tj, tokens, bool(model.get("merges")), pre_override)

    def tok_id(key: str) -> int | None:
        val = tcfg.get(key)
        if isinstance(val, dict):
            val = val.get("content")
        if isinstance(val, str) and val in vocab:
            return vocab[val]
        cid = cfg.get(f"{key}_id")
        return cid if isinstance(cid, int) and 0 <= cid < n_vocab else None

    specials = {k: tok_id(f"{k}_token") for k in ("bos", "eos", "unk", "pad")}
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:
        single = ((tj.get("post_processor") or {}).get("single")) or []
        add_bos = any("SpecialToken" in part for part in single[:1])
    template = tcfg.get("chat_template")
    if template is None and (ckpt / "chat_template.jinja").is_file():
        template = (ckpt / "chat_template.jinja").read_text()
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "pre_source": pre_source,
            "special": specials, "add_bos": bool(add_bos), "add_eos": bool(tcfg.get("add_eos_token", False)),
            "chat_template": template if isinstance(template, str) else None}


def _pre_tokenizer(ckpt: Path, tj: dict, tokens: list[str], has_merges: bool,
                   override: str | None) -> tuple[str, str]:
    """llama.cpp's pre-tokenizer name. convert_hf_to_gguf.py hashes the tokenization of a probe text and looks
    the hash up in a table; here: (1) the caller's choice, (2) the GGUF the checkpoint was made from, found
    through the manifests' ``source`` links, when its vocabulary is the same (the default model's cache was
    dequantized from a GGUF whose tokenizer transformers rebuilt without its digit splitting: SmolLM2's
    original pre-tokenizer is ``smollm``), (3) the structure of tokenizer.json's pre_tokenizer."""
    if override:
        return override, "argument"
    from_gguf = _pre_from_source_gguf(ckpt, tokens)
    if from_gguf:
        return from_gguf
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        if steps[0].get("use_regex", True) or not has_merges:
            return "gpt-2", "tokenizer.json"  # with no merges any pre-split gives the same byte tokens
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm", "tokenizer.json"  # digits one by one, then the GPT-2 regex (also starcoder's)
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_REGEX_PRE.get((steps[0].get("pattern") or {}).get("Regex", ""))
        if name:
            return name, "tokenizer.json"
    raise EdgePruneError(f"unrecognised pre-tokenizer {kinds} in {ckpt / 'tokenizer.json'}: "
                         "pass pre_tokenizer=<llama.cpp name> to export_gguf")


def _pre_from_source_gguf(ckpt: Path, tokens: list[str]) -> tuple[str, str] | None:
    seen: set[str] = set()
    path = ckpt
    for _ in range(4):
        mf = path / "manifest.json"
        if not mf.is_file():
            return None
        try:
            src = json.loads(mf.read_text()).get("source")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(src, str) or src in seen:
            return None
        seen.add(src)
        p = Path(src)
        if p.is_file() and p.suffix == ".gguf":
            try:
                meta = _gguf_metadata(p, ("tokenizer.ggml.pre", "tokenizer.ggml.tokens"))
            except EdgePruneError:
                return None
            if meta.get("tokenizer.ggml.tokens") != tokens or not meta.get("tokenizer.ggml.pre"):
                return None
            return str(meta["tokenizer.ggml.pre"]), f"source GGUF {p.name}"
        if not p.is_dir():
            return None
        path = p
    return None


# ------------------------------------------------------------------------------------------------ plan


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q/k (weight or bias) from HF's rotate-half order to llama.cpp's interleaved pairs."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Out:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    load: Any  # () -> float32 array
    matrix: bool


def _plan(ckpt: Path, cfg: dict, st: _Tensors) -> dict:
    """Decide arch, per-layer shapes, tensors (lazy) and folded biases; validate every tensor's shape."""
    hidden = int(cfg["hidden_size"])
    n_layer = int(cfg["num_hidden_layers"])
    heads0 = int(cfg.get("num_attention_heads", 0))
    head_dim = int(cfg.get("head_dim") or hidden // heads0)
    heads = [int(x) for x in (cfg.get("layer_num_heads") or [heads0] * n_layer)]
    kvs = [int(x) for x in (cfg.get("layer_num_kv_heads") or [cfg.get("num_key_value_heads") or heads0] * n_layer)]
    ffs = [int(x) for x in (cfg.get("layer_intermediate_size") or [cfg["intermediate_size"]] * n_layer)]
    if not (len(heads) == len(kvs) == len(ffs) == n_layer):
        raise EdgePruneError("config per-layer lists do not match num_hidden_layers")
    if head_dim % 2:
        raise EdgePruneError(f"head_dim {head_dim} is odd: RoPE needs pairs")
    names = st.names()
    used: set[str] = set()

    def need(name: str, shape: tuple[int, ...]) -> str:
        if name not in names:
            raise EdgePruneError(f"checkpoint is missing tensor {name}")
        if st.shape(name) != shape:
            raise EdgePruneError(f"tensor {name} has shape {list(st.shape(name))}, config implies {list(shape)}")
        used.add(name)
        return name

    def opt(name: str, shape: tuple[int, ...]) -> str | None:
        return need(name, shape) if name in names else None

    emb = "model.embed_tokens.weight"
    need(emb, (st.shape(emb)[0] if emb in names else 0, hidden))
    n_vocab = st.shape(emb)[0]
    lm_head = opt("lm_head.weight", (n_vocab, hidden))
    need("model.norm.weight", (hidden,))

    uniform = (len(set(heads)) == len(set(kvs)) == len(set(ffs)) == 1 and heads[0] > 0 and kvs[0] > 0
               and ffs[0] > 0)
    arch = "llama" if uniform else "deci"

    # pass 1: which blocks exist; constant biases of removed blocks fold into the previous existing block
    for i in range(n_layer):
        h, kv = heads[i], kvs[i]
        if (h == 0) != (kv == 0) or (kv and h % kv):
            raise EdgePruneError(f"layer {i}: {h} query heads cannot share {kv} KV heads")
    kept = [i for i in range(n_layer) if heads[i] or ffs[i]]
    if not kept:
        raise EdgePruneError("every decoder layer is empty (no attention and no MLP): nothing to export")
    consts_before = any(f"model.layers.{i}.{m}.bias" in names for i in range(kept[0]) for m in ("self_attn", "mlp"))
    # llama.cpp reads the head size (key_length) only when layer 0 has heads (llama-model.cpp, load_hparams:
    # `if (hparams.n_head() > 0)`), so a GGUF whose first layer has no attention gets a zero layer in front:
    # one head with zero weights (softmax over zero scores averages zero values) and a zero placeholder FFN.
    # Its biases also take the constants of removed blocks that come before any existing block.
    dummy = arch == "deci" and (heads[kept[0]] == 0 or consts_before)
    layers: list[_LayerShape] = [_LayerShape(-1, 1, 1, PLACEHOLDER_FFN, 0)] if dummy else []
    out_bias: dict[tuple[int, str], np.ndarray] = {}  # (gguf layer, "attn"|"ffn") -> bias to add
    last: tuple[int, str] | None = (0, "ffn") if dummy else None
    folded = []

    def fold(vec_name: str | None, what: str):
        if vec_name is None:
            return
        assert last is not None
        out_bias[last] = out_bias.get(last, 0) + st.get(need(vec_name, (hidden,)))
        folded.append({"from": what, "into": f"blk.{last[0]}.{'attn_output' if last[1] == 'attn' else 'ffn_down'}.bias"})

    for i in range(n_layer):
        p = f"model.layers.{i}."
        h, kv, ff = heads[i], kvs[i], ffs[i]
        attn_const = p + "self_attn.bias" if h == 0 and p + "self_attn.bias" in names else None
        mlp_const = p + "mlp.bias" if ff == 0 and p + "mlp.bias" in names else None
        if h == 0 and ff == 0:
            fold(attn_const, f"layer {i} attention")
            fold(mlp_const, f"layer {i} mlp")
            continue  # identity layer: left out
        j = len(layers)
        layers.append(_LayerShape(i, h, kv, ff if ff else PLACEHOLDER_FFN, ff))
        if h == 0:
            fold(attn_const, f"layer {i} attention")
        if ff == 0 and mlp_const is not None:
            out_bias[(j, "ffn")] = st.get(need(mlp_const, (hidden,)))
        last = (j, "ffn")

    # pass 2: tensors
    outs: list[_Out] = []

    def add(name: str, shape: tuple[int, ...], load, matrix: bool):
        outs.append(_Out(name, tuple(int(s) for s in shape), load, matrix))

    def from_st(key: str, transform=None):
        return lambda: transform(st.get(key)) if transform else st.get(key)

    add("token_embd.weight", (n_vocab, hidden), from_st(emb), True)
    add("output_norm.weight", (hidden,), from_st("model.norm.weight"), False)
    if lm_head is not None:
        add("output.weight", (n_vocab, hidden), from_st(lm_head), True)
    rope = _rope(cfg)
    if rope["rope_type"] == "llama3":
        factors = _llama3_rope_factors(rope, head_dim, cfg)
        add("rope_freqs.weight", factors.shape, lambda: factors, False)

    def zeros(shape):
        return lambda: np.zeros(shape, dtype=np.float32)

    for j, L in enumerate(layers):
        p, b = f"model.layers.{L.src}.", f"blk.{j}."
        if L.src < 0:  # the zero layer in front (see pass 1)
            add(b + "attn_norm.weight", (hidden,), lambda: np.ones(hidden, dtype=np.float32), False)
            for gg, shape in (("attn_q", (head_dim, hidden)), ("attn_k", (head_dim, hidden)),
                              ("attn_v", (head_dim, hidden)), ("attn_output", (hidden, head_dim))):
                add(f"{b}{gg}.weight", shape, zeros(shape), True)
        elif L.heads:
            q, kv_rows = L.heads * head_dim, L.kv_heads * head_dim
            add(b + "attn_norm.weight", (hidden,), from_st(need(p + "input_layernorm.weight", (hidden,))), False)
            for hf, gg, rows, nh in (("q_proj", "attn_q", q, L.heads), ("k_proj", "attn_k", kv_rows, L.kv_heads),
                                     ("v_proj", "attn_v", kv_rows, None)):
                perm = (lambda a, nh=nh: _permute_rope(a, nh)) if nh else None
                add(f"{b}{gg}.weight", (rows, hidden), from_st(need(f"{p}self_attn.{hf}.weight", (rows, hidden)),
                                                               perm), True)
                if bk := opt(f"{p}self_attn.{hf}.bias", (rows,)):
                    add(f"{b}{gg}.bias", (rows,), from_st(bk, perm), False)
            add(b + "attn_output.weight", (hidden, q), from_st(need(p + "self_attn.o_proj.weight", (hidden, q))), True)
            _bias(add, st, opt(p + "self_attn.o_proj.bias", (hidden,)), out_bias.get((j, "attn")),
                  b + "attn_output.bias", hidden)
        add(b + "ffn_norm.weight", (hidden,), from_st(need(p + "post_attention_layernorm.weight", (hidden,)))
            if L.hf_ffn else (lambda: np.ones(hidden, dtype=np.float32)), False)
        n = L.ffn
        for hf, gg, shape in (("gate_proj", "ffn_gate", (n, hidden)), ("up_proj", "ffn_up", (n, hidden)),
                              ("down_proj", "ffn_down", (hidden, n))):
            if L.hf_ffn:
                add(f"{b}{gg}.weight", shape, from_st(need(f"{p}mlp.{hf}.weight", shape)), True)
                if hf != "down_proj" and (bk := opt(f"{p}mlp.{hf}.bias", (n,))):
                    add(f"{b}{gg}.bias", (n,), from_st(bk), False)
            else:
                add(f"{b}{gg}.weight", shape, zeros(shape), True)
        _bias(add, st, opt(p + "mlp.down_proj.bias", (hidden,)) if L.hf_ffn else None, out_bias.get((j, "ffn")),
              b + "ffn_down.bias", hidden)
        # post-norm of a layer whose MLP was removed is unused in HF too
        if not L.hf_ffn:
            used.add(p + "post_attention_layernorm.weight")
        if not L.heads:
            used.add(p + "input_layernorm.weight")
    for i in range(n_layer):  # norms of dropped layers are unused by HF as well
        if heads[i] == 0 and ffs[i] == 0:
            used.update({f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"})
    ignorable = {n for n in names if n.endswith("rotary_emb.inv_freq")}
    unknown = sorted(names - used - ignorable)
    if unknown:
        raise EdgePruneError(f"checkpoint has tensors the GGUF writer does not know: {', '.join(unknown[:5])}")
    return {"arch": arch, "hidden": hidden, "head_dim": head_dim, "n_vocab": n_vocab, "layers": layers,
            "outs": outs, "rope": rope, "folded": folded, "n_layer_hf": n_layer,
            "tied": lm_head is None, "zero_layer": dummy}


def _bias(add, st: _Tensors, key: str | None, extra, name: str, hidden: int) -> None:
    if key is None and extra is None:
        return

    def load():
        v = st.get(key) if key is not None else np.zeros(hidden, dtype=np.float32)
        return v + extra if extra is not None else v

    add(name, (hidden,), load, False)


# ----------------------------------------------------------------------------------------------- writing


def _encode(out: _Out, dtype: str):
    """(array to write, GGML type) for one tensor: 1-D tensors stay f32, matrices follow ``dtype``."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    arr = out.load()
    if arr.shape != out.shape:
        raise EdgePruneError(f"internal error: {out.name} has shape {arr.shape}, expected {out.shape}")
    if not out.matrix or dtype == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32), Q.F32
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return quantize(arr, Q.Q8_0), Q.Q8_0
    return arr.astype(np.float16), Q.F16  # f16, and q8_0's fallback for rows not a multiple of 32


def _nbytes(out: _Out, dtype: str) -> tuple[int, Any]:
    from gguf import GGMLQuantizationType as Q
    from gguf.constants import GGML_QUANT_SIZES

    n = int(np.prod(out.shape))
    if not out.matrix or dtype == "f32":
        return 4 * n, Q.F32
    if dtype == "q8_0" and out.shape[-1] % 32 == 0:
        block, size = GGML_QUANT_SIZES[Q.Q8_0]
        return n // block * size, Q.Q8_0
    return 2 * n, Q.F16


def _write(path: Path, plan: dict, tok: dict, cfg: dict, dtype: str, name: str) -> dict:
    import gguf

    arch = plan["arch"]
    layers: list[_LayerShape] = plan["layers"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[dtype])
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(plan["hidden"])
    w.add_block_count(len(layers))
    if arch == "llama":
        w.add_head_count(layers[0].heads)
        w.add_head_count_kv(layers[0].kv_heads)
        w.add_feed_forward_length(layers[0].ffn)
    else:
        w.add_head_count([L.heads for L in layers])
        w.add_head_count_kv([L.kv_heads for L in layers])
        w.add_feed_forward_length([L.ffn for L in layers])
    w.add_key_length(plan["head_dim"])
    w.add_value_length(plan["head_dim"])
    w.add_rope_dimension_count(plan["head_dim"])
    rope = plan["rope"]
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(plan["n_vocab"])
    w.add_array("edgeprune.source_layers", [L.src for L in layers])
    # tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                    ("pad", w.add_pad_token_id)):
        if tok["special"][key] is not None:
            fn(tok["special"][key])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])

    types: dict[str, int] = {}
    for out in plan["outs"]:
        nbytes, qtype = _nbytes(out, dtype)
        w.add_tensor_info(out.name, out.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for out in plan["outs"]:
        arr, _ = _encode(out, dtype)
        w.write_tensor_data(arr)
    w.close()
    return types


def _quantize_llama_cpp(src: Path, dst: Path, dtype: str) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise EdgePruneError(f"dtype {dtype} needs llama-cpp-python: pip install 'edgeprune[gguf-runtime]'") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FILE_TYPE[dtype]
    params.nthread = max(1, os.cpu_count() or 1)
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # one fallback warning per tensor whose rows are not 256-aligned
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise EdgePruneError(f"llama.cpp could not quantize {src.name} to {dtype} (code {rc})")


def _check_output(out: Path) -> None:
    if out.is_dir():
        raise EdgePruneError(f"output path {out} is a directory")
    check_writable_parent(out)


def export_gguf(checkpoint_dir, out_path, dtype: str = "f16", *, pre_tokenizer: str | None = None) -> dict:
    """Write ``checkpoint_dir`` (an HF Llama/Mistral/Qwen2 directory, dense or edgeprune-pruned) as a GGUF file.

    The file appears at ``out_path`` only when complete (temp file beside it, then ``os.replace``).
    Returns an info dict (arch, dtype, size_bytes, sha256, per-layer shapes, folded biases, tokenizer).
    """
    start = time.perf_counter()
    if dtype not in GGUF_DTYPES:
        raise EdgePruneError(f"unknown GGUF dtype {dtype!r} (choose from {', '.join(GGUF_DTYPES)})")
    ckpt = _resolve_checkpoint(Path(checkpoint_dir).expanduser())
    out = Path(out_path).expanduser()
    cfg = _model_config(ckpt)
    _check_output(out)
    st = _Tensors(ckpt)
    plan = _plan(ckpt, cfg, st)
    tok = _tokenizer(ckpt, cfg, plan["n_vocab"], pre_tokenizer)
    name = str(cfg.get("_name_or_path") or cfg.get("_model_name_or_path") or ckpt.name)
    if "/" in name or os.sep in name:
        name = Path(name).name
    temps: list[str] = []

    def temp(suffix: str) -> Path:
        fd, p = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent)
        os.close(fd)
        temps.append(p)
        return Path(p)

    try:
        if dtype == "q4_k_m":
            base = temp(".f32.tmp")
            types = _write(base, plan, tok, cfg, "f32", name)
            final = temp(".tmp")
            _quantize_llama_cpp(base, final, dtype)
            types = _tensor_types(final)
        else:
            final = temp(".tmp")
            types = _write(final, plan, tok, cfg, dtype, name)
        digest = sha256_file(final)
        size = final.stat().st_size
        os.chmod(final, 0o644)
        os.replace(final, out)
    except OSError as e:
        raise EdgePruneError(f"cannot write {out}: {e.strerror or first_line(e)}") from None
    finally:
        for p in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    layers = plan["layers"]
    return {
        "path": str(out), "format": "gguf", "arch": plan["arch"], "dtype": dtype, "file_type": _FILE_TYPE[dtype],
        "size_bytes": size, "sha256": digest, "source": str(ckpt), "family": cfg["_family"],
        "hidden_size": plan["hidden"], "head_dim": plan["head_dim"], "vocab_size": plan["n_vocab"],
        "n_layers": len(layers), "source_layers": plan["n_layer_hf"],
        "dropped_layers": sorted(set(range(plan["n_layer_hf"])) - {L.src for L in layers}),  # identity layers
        "layers": [{"source_layer": L.src, "heads": L.heads, "kv_heads": L.kv_heads, "ffn": L.hf_ffn,
                    "gguf_ffn": L.ffn} for L in layers],
        "placeholder_ffn_layers": [L.src for L in layers if not L.hf_ffn and L.src >= 0],
        "zero_layer_in_front": plan["zero_layer"],
        "folded_biases": plan["folded"], "tied_embeddings": plan["tied"],
        "rope": {"type": plan["rope"]["rope_type"], "theta": plan["rope"]["rope_theta"]},
        "tokenizer": {"model": "gpt2", "pre": tok["pre"], "pre_source": tok["pre_source"], "add_bos": tok["add_bos"],
                      "n_tokens": len(tok["tokens"]), "n_merges": len(tok["merges"])},
        "tensor_types": types, "seconds": time.perf_counter() - start,
    }


def _tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_metadata(path, keys: tuple[str, ...]) -> dict:
    """Metadata values of a GGUF file, read from its header (arrays not asked for are skipped: much faster
    than gguf.GGUFReader on a 49k-token vocabulary)."""
    import struct

    found: dict = {}
    try:
        with open(path, "rb") as f:
            def read(fmt: str):
                return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

            def string() -> str:
                return f.read(read("Q")).decode("utf-8", errors="replace")

            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            read("I")
            read("Q")
            for _ in range(read("Q")):
                key, vtype = string(), read("I")
                if vtype == 8:
                    val = string()
                elif vtype == 9:
                    etype, count = read("I"), read("Q")
                    if key in keys:  # wanted: read it (strings or scalars)
                        val = [string() if etype == 8 else read(_SCALAR[etype]) for _ in range(count)]
                    elif etype == 8:
                        for _ in range(count):
                            f.seek(read("Q"), 1)
                        continue
                    else:
                        f.seek(struct.calcsize("<" + _SCALAR[etype]) * count, 1)
                        continue
                else:
                    val = read(_SCALAR[vtype])
                if key in keys:
                    found[key] = val
                    if len(found) == len(keys):
                        break
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise EdgePruneError(f"{path} is not a readable GGUF file: {first_line(e)}") from None
    return found


def gguf_dtype(gguf_path) -> str:
    """The export dtype of a GGUF file, from ``general.file_type`` ("f32", "f16", "q8_0", "q4_k_m" or "ftype-N")."""
    ft = _gguf_metadata(gguf_path, ("general.file_type",)).get("general.file_type", 0)
    return _FILE_TYPE_NAME.get(int(ft), f"ftype-{ft}")


# ------------------------------------------------------------------------------------------------ checks


def _llama(gguf_path, n_ctx: int, n_threads: int | None = None):
    """A llama.cpp context that keeps every token's logits and an f32 KV cache (so that the comparison
    measures the weights' format only). Extra CPU buffer types stay on for f32/f16 files (4x faster f16
    prefill here) and are turned off for quantized files (see ``_no_extra_buffer_types``)."""
    try:
        import llama_cpp
    except ImportError:
        raise EdgePruneError("GGUF checks need llama-cpp-python: pip install 'edgeprune[gguf-runtime]'") from None
    path = Path(gguf_path)
    if not path.is_file():
        raise EdgePruneError(f"GGUF file not found: {path}")
    quantized = gguf_dtype(path) not in ("f32", "f16")
    try:
        # with the CPU's extra buffer types (AMX / repacked weights) the bundled llama.cpp segfaulted in
        # llama_decode on every quantized GGUF tried here (ours, llama.cpp's own Q8_0, the default Q4_1 file)
        with _no_extra_buffer_types(llama_cpp) if quantized else contextlib.nullcontext():
            return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                   n_threads=n_threads, n_threads_batch=n_threads, type_k=0, type_v=0, seed=0,
                                   verbose=False)
    except Exception as e:  # llama.cpp reports a failed load as ValueError/RuntimeError
        raise EdgePruneError(f"llama.cpp cannot load {path}: {first_line(e)}") from None


def _logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def check_gguf(gguf_path, checkpoint_dir, prompts: list[str] | None = None, n_tokens: int = 16, *,
               lm=None, n_threads: int | None = None) -> dict:
    """Compare the GGUF in llama.cpp with the checkpoint in PyTorch (fp32) on the same token ids.

    Reports the max |logit difference| and top-1 agreement over all prompt positions, whether greedy
    decoding of ``n_tokens`` gives the same tokens, whether llama.cpp's tokenizer gives the HF token ids,
    and llama.cpp's decode speed. ``passed``: max |diff| within ``TOLERANCE[dtype]``, and for f32/f16 the same
    greedy tokens (a divergence at a near-tie, PyTorch's top-2 gap within 2x the tolerance, is allowed), for
    quantized files top-1 agreement of at least ``MIN_TOP1[dtype]``.
    ``lm``: the checkpoint already loaded (``edgeprune.models.load``), to save loading it again.
    ``decode_tokens_per_s`` is the wall clock of the greedy loop (one llama_decode per token, all logits
    kept): a rough figure, not a benchmark.
    """
    import torch

    from edgeprune.models import load

    if not Path(gguf_path).is_file():
        raise EdgePruneError(f"GGUF file not found: {gguf_path}")
    prompts = list(prompts or DEFAULT_PROMPTS)
    dtype = gguf_dtype(gguf_path)
    lm = lm if lm is not None else load(str(checkpoint_dir))
    tok, model = lm.tokenizer, lm.model
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if any(not x for x in ids):
        raise EdgePruneError("every check prompt must give at least one token")
    # PyTorch first: llama.cpp's worker threads keep spinning while a context is alive and slowed torch ~8x
    with torch.inference_mode():
        refs = [model(input_ids=torch.tensor([x]), use_cache=False).logits[0].float().numpy() for x in ids]
    ref_tokens, margins = _torch_greedy(model, ids[0], n_tokens)  # greedy decoding from the first prompt
    ref_text = tok.decode(ref_tokens)
    add_bos = _adds_bos(tok)
    llm = _llama(gguf_path, max(len(x) for x in ids) + n_tokens + 8, n_threads)
    try:
        max_diff, agree, total, kl_sum = 0.0, 0, 0, 0.0
        for x, ref in zip(ids, refs, strict=True):
            got = _logits(llm, x)
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            kl_sum += float(_kl(ref, got).sum())
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            total += len(x)
        llm.reset()
        llm.eval(ids[0])
        got_tokens = []
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got_tokens.append(nxt)
            llm.eval([nxt])
        decode_s = time.perf_counter() - t0
        tokenizer_match = all(llm.tokenize(p.encode("utf-8"), add_bos=add_bos, special=False) == x
                              for p, x in zip(prompts, ids, strict=True))
        got_text = llm.detokenize(got_tokens).decode("utf-8", errors="replace")
    finally:
        llm.close()
    mismatch = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens, strict=True)) if a != b), None)
    tol = TOLERANCE.get(dtype, TOLERANCE["q4_k_m"])
    top1 = agree / total
    exact = dtype in ("f32", "f16")
    near_tie = mismatch is not None and margins[mismatch] <= 2 * tol
    greedy_ok = mismatch is None or near_tie or not exact
    mean_kl = kl_sum / total
    kl_ok = mean_kl <= MAX_MEAN_KL.get(dtype, float("inf"))
    passed = max_diff <= tol and greedy_ok and kl_ok and (exact or top1 >= MIN_TOP1.get(dtype, 0.5))
    return {
        "dtype": dtype, "max_abs_logit_diff": max_diff, "mean_kl": mean_kl, "top1_agreement": top1,
        "positions": total,
        "greedy_match": mismatch is None, "greedy_first_mismatch": mismatch,
        "greedy_mismatch_is_near_tie": near_tie, "greedy_tokens": got_tokens, "reference_tokens": ref_tokens,
        "greedy_text": got_text, "reference_text": ref_text, "tokenizer_match": tokenizer_match,
        "decode_tokens_per_s": n_tokens / decode_s if decode_s > 0 else None,
        "tolerance": {"max_abs_logit_diff": tol, "max_mean_kl": MAX_MEAN_KL.get(dtype), "min_top1_agreement": None if exact else MIN_TOP1.get(dtype, 0.5),
                      "greedy_required": exact, "kv_cache": "f32"},
        "passed": bool(passed), "prompts": len(prompts), "n_tokens": n_tokens,
    }


def _kl(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) per position, in nats."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _adds_bos(tok) -> bool:
    bos = getattr(tok, "bos_token_id", None)
    return bos is not None and tok("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _torch_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens (no EOS stop) and the top-1/top-2 logit gap at each step."""
    import torch

    out, margins = [], []
    with torch.inference_mode():
        res = model(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            logits = res.logits[0, -1].float()
            top = torch.topk(logits, 2)
            nxt = int(top.indices[0])
            out.append(nxt)
            margins.append(float(top.values[0] - top.values[1]))
            cache = res["cache"] if "cache" in res else res.past_key_values  # transformers 5 renamed it
            res = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
    return out, margins


def gguf_perplexity(gguf_path, text, seq_len: int = 128, max_tokens: int | None = None, *,
                    token_ids: list[int] | None = None, n_threads: int | None = None) -> dict:
    """Perplexity in llama.cpp with edgeprune's protocol (``edgeprune.evaluate.ppl``): the text tokenized once
    (llama.cpp's tokenizer, no BOS; or the given ``token_ids``), cut into non-overlapping ``seq_len`` windows,
    each scored independently, PPL = exp(mean NLL over all predicted tokens)."""
    if seq_len < 2:
        raise EdgePruneError("seq_len must be at least 2")
    raw = getattr(text, "text", text)
    name = getattr(text, "name", "text")
    llm = _llama(gguf_path, seq_len, n_threads)
    try:
        ids = list(token_ids) if token_ids is not None else llm.tokenize(raw.encode("utf-8"), add_bos=False,
                                                                         special=False)
        total = len(ids)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        n_windows = len(ids) // seq_len
        if n_windows == 0:
            raise EdgePruneError(f"text has {len(ids)} tokens, fewer than one window of seq_len {seq_len}")
        nll, count = 0.0, 0
        start = time.perf_counter()
        for w in range(n_windows):
            win = ids[w * seq_len: (w + 1) * seq_len]
            logits = _logits(llm, win)[:-1].astype(np.float64)
            m = logits.max(-1, keepdims=True)
            logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
            target = np.asarray(win[1:])
            nll += float((logz - logits[np.arange(len(target)), target]).sum())
            count += len(target)
        seconds = time.perf_counter() - start
    finally:
        llm.close()
    mean = nll / count
    return {"ppl": math.exp(mean), "nll": mean, "seq_len": seq_len, "windows": n_windows,
            "tokens_scored": n_windows * seq_len, "tokens_in_text": total, "max_tokens": max_tokens,
            "text": name, "tokenizer": "given ids" if token_ids is not None else "llama.cpp", "seconds": seconds,
            "prompt_tokens_per_s": n_windows * seq_len / seconds if seconds > 0 else None}
