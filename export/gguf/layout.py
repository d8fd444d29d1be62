"""Which tensors go where: a checkpoint's family, shapes and quirks turned into one llama.cpp architecture, its
hyper-parameters and the list of GGUF tensors (loaded lazily, transformed as llama.cpp expects).

Tensor names on the Hugging Face side come from the family table (``edgeprune.adapters.families``: role
templates, fused-row slices, quirks), on the GGUF side from gguf-py (``gguf.TENSOR_NAMES``, ``gguf.Keys``);
what an architecture can represent from ``archs.py``. The architecture is the family's own (``gguf_arch``) when
it fits the checkpoint, else the family's per-layer one (``gguf_per_layer_arch``: ``deci``), else export stops
with one line saying why. Transforms, all exact:

- RoPE rows: Hugging Face rotates the two halves of each head (or interleaved pairs: GLM); q/k rows (and their
  biases and q/k norms) are permuted to the layout of the architecture's RoPE (NORM = pairs, NEOX = halves),
  over the first ``rope.dimension_count`` dims of each head (partial rotary);
- norms: llama.cpp multiplies by the stored weight, so Gemma's ``(1 + w)`` norms are stored as ``1 + w``;
- Gemma 3's query scale (``query_pre_attn_scalar ** -0.5``) differs from llama.cpp's fixed ``1/sqrt(head_dim)``
  by a constant that is folded into the q norm (q is normalised, rotated and scaled linearly);
- fused tensors are split (or joined, for architectures that read ``ffn_up`` as [gate; up]) by the family's rows.

Removed blocks (deci only; llama.cpp's deci loader and graph, checked against the bundled build):
- attention removed (0 heads): no attention tensors; its constant output (bias compensation) is folded into the
  output bias of the previous block that exists (a constant added to the residual commutes with absent blocks).
- llama.cpp reads ``key_length`` only when layer 0 has heads, so when the first written layer has no attention
  (or constants precede every block) a zero layer goes in front: 1 head of zero weights, a zero placeholder FFN,
  biases carrying those constants.
- MLP removed in a layer that keeps attention: deci's ``n_ff == 0`` branch drops the layer's attention output,
  so such a layer gets a placeholder FFN of ``PLACEHOLDER_FFN`` zero channels whose ``ffn_down.bias`` carries
  the constant. Both removed: the layer is an identity (plus folded constants) and is left out.

It reads the checkpoint (``source.py``) but writes nothing (``writer.py`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from edgeprune.export.gguf.archs import ARCHS, Arch, Facts, arch_tensors, fit
from edgeprune.export.gguf.hparams import hyperparameters
from edgeprune.export.gguf.source import Tensors, llama3_rope_factors, rope_parameters

from edgeprune.adapters.families import NORM_ROLES, Family, tensor_name
from edgeprune.errors import EdgePruneError, FormatUnsupported

PLACEHOLDER_FFN = 32
T = gguf.MODEL_TENSOR
ROLE_TENSOR = {"embed": T.TOKEN_EMBD, "final_norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT, "q": T.ATTN_Q,
               "k": T.ATTN_K, "v": T.ATTN_V, "o": T.ATTN_OUT, "gate": T.FFN_GATE, "up": T.FFN_UP,
               "down": T.FFN_DOWN, "attn_norm": T.ATTN_NORM, "mlp_norm": T.FFN_NORM,
               "attn_post_norm": T.ATTN_POST_NORM, "mlp_post_norm": T.FFN_POST_NORM, "q_norm": T.ATTN_Q_NORM,
               "k_norm": T.ATTN_K_NORM}


def gguf_name(role: str, layer: int | None = None, kind: str = "weight") -> str:
    return f"{gguf.TENSOR_NAMES[ROLE_TENSOR[role]].format(bid=layer)}.{kind}"


@dataclass
class LayerShape:
    src: int  # Hugging Face layer index (-1: the zero layer in front)
    heads: int
    kv_heads: int
    ffn: int  # in the GGUF (a placeholder width where the MLP was removed)
    hf_ffn: int


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols)
    load: Any  # () -> float32 array
    matrix: bool


@dataclass
class Layout:
    arch: str
    family: str
    hidden: int
    head_dim: int
    n_rot: int
    n_vocab: int
    n_layer_hf: int
    layers: list[LayerShape]
    tensors: list[OutTensor] = field(default_factory=list)
    kv: dict[str, Any] = field(default_factory=dict)  # architecture hyper-parameters, full GGUF keys
    rope: dict = field(default_factory=dict)
    folded: list[dict] = field(default_factory=list)
    tied: bool = False
    zero_layer: bool = False
    notes: list[str] = field(default_factory=list)


def rope_perm(head_dim: int, n_rot: int, to_pairs: bool) -> np.ndarray:
    """Row order within one head taking rotate-half rows to interleaved pairs (or back) over the first n_rot."""
    half = n_rot // 2
    pairs = np.stack([np.arange(half), np.arange(half) + half], 1).reshape(-1)  # out 2p+b <- in b*half+p
    inner = pairs if to_pairs else np.argsort(pairs)
    return np.concatenate([inner, np.arange(n_rot, head_dim)])


class _Source:
    """The checkpoint's tensors by (role, layer), with shape checks and a record of what was used."""

    def __init__(self, st: Tensors, fam: Family, hidden: int, head_dim: int):
        self.st, self.fam, self.hidden, self.head_dim = st, fam, hidden, head_dim
        self.names = st.names()
        self.used: set[str] = set()

    def name(self, role: str, i: int | None, kind: str = "weight", dims=(0, 0, 0)) -> tuple[str, slice | None]:
        h, kv, ff = dims
        return tensor_name(self.fam, role, i, kind, h, kv, self.head_dim, ff)

    def has(self, role: str, i: int | None, kind: str = "weight") -> bool:
        return self.fam.has_role(role) and self.name(role, i, kind)[0] in self.names

    def need(self, name: str, shape: tuple[int, ...]) -> str:
        if name not in self.names:
            raise EdgePruneError(f"checkpoint is missing tensor {name}")
        if self.st.shape(name) != tuple(shape):
            raise EdgePruneError(f"tensor {name} has shape {list(self.st.shape(name))}, config implies {list(shape)}")
        self.used.add(name)
        return name

    def role(self, role: str, i: int | None, shape: tuple[int, ...], dims=(0, 0, 0), kind: str = "weight",
             transform=None):
        """A loader for ``role`` (rows of a fused tensor where the family fuses it)."""
        name, rows = self.name(role, i, kind, dims)
        if rows is None:
            self.need(name, shape)
        else:  # the fused tensor holds its members' rows one after the other
            last = self.name(self.fam.fused_members(role)[-1], i, kind, dims)[1]
            self.need(name, (last.stop, *shape[1:]))

        def load():
            arr = self.st.get(name)
            arr = arr[rows] if rows is not None else arr
            return transform(arr) if transform else arr
        return load

    def get(self, name: str, shape: tuple[int, ...]):
        self.need(name, shape)
        return lambda: self.st.get(name)


def removed_block_bias(fam: Family, role: str, i: int) -> str:
    """The constant output of a removed attention ("o") or MLP ("down") block: the stub module's bias, which
    sits where the block's module was (``models/remote_code.py``: PrunedAttention / PrunedMLP)."""
    return fam.module_path(role, i).rpartition(".")[0] + ".bias"


def unit_dims(cfg: dict) -> tuple[int, int, list[int], list[int], list[int]]:
    hidden, n_layer = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    heads0 = int(cfg.get("num_attention_heads", 0))
    heads = [int(x) for x in (cfg.get("layer_num_heads") or [heads0] * n_layer)]
    kvs = [int(x) for x in (cfg.get("layer_num_kv_heads") or [cfg.get("num_key_value_heads") or heads0] * n_layer)]
    ffs = [int(x) for x in (cfg.get("layer_intermediate_size") or [cfg["intermediate_size"]] * n_layer)]
    if not (len(heads) == len(kvs) == len(ffs) == n_layer):
        raise EdgePruneError("config per-layer lists do not match num_hidden_layers")
    for i, (h, kv) in enumerate(zip(heads, kvs, strict=True)):
        if (h == 0) != (kv == 0) or (kv and h % kv):
            raise EdgePruneError(f"layer {i}: {h} query heads cannot share {kv} KV heads")
    return hidden, n_layer, heads, kvs, ffs


def _n_rot(cfg: dict, fam: Family, head_dim: int, rope: dict) -> int:
    factor = 1.0
    if fam.partial_rotary:
        factor = float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
    n_rot = int(head_dim * factor)
    if n_rot % 2 or n_rot == 0:
        raise EdgePruneError(f"RoPE over {n_rot} of head_dim {head_dim} dims: llama.cpp needs an even count")
    return n_rot


def _facts(cfg, fam: Family, src: _Source, hidden, head_dim, n_rot, heads, kvs, ffs) -> Facts:
    kept = [i for i in range(len(heads)) if heads[i]]
    mlps = [i for i in range(len(ffs)) if ffs[i]]
    outs = {r for r, blocks in (("o", kept), ("down", mlps)) for i in blocks if src.has(r, i, "bias")}
    outs |= {r for r in ("o", "down") for i in range(len(heads)) if removed_block_bias(fam, r, i) in src.names}
    norms = {gguf.TENSOR_NAMES[ROLE_TENSOR[r]] for r in NORM_ROLES if fam.has_role(r)}
    return Facts(
        uniform=len(set(zip(heads, kvs, ffs, strict=True))) == 1 and heads[0] > 0 and ffs[0] > 0,
        removed_blocks=not all(heads) or not all(ffs), full_rotary=n_rot == head_dim,
        attention_hidden_wide=all(h * head_dim == hidden for h in heads),
        qkv_bias=any(src.has(r, i, "bias") for i in kept for r in ("q", "k", "v")), out_biases=frozenset(outs),
        activation=str(cfg.get(fam.activation_key, fam.activation)), embed_scale=fam.embed_scale,
        norm_kinds=frozenset(norms), sliding_window=False)


def choose_arch(fam: Family, facts: Facts) -> Arch:
    """The family's own architecture if it fits, else its per-layer one, else a one-line EdgePruneError."""
    reasons = []
    for name in dict.fromkeys(a for a in (fam.gguf_arch, fam.gguf_per_layer_arch) if a):
        why = fit(ARCHS[name], facts)
        if why is None:
            return ARCHS[name]
        reasons.append(why)
    if not fam.gguf_per_layer_arch and not facts.uniform:
        reasons.append(f"no llama.cpp architecture has per-layer widths for {fam.name}")
    hint = ""
    if not facts.uniform:  # everything the user must change, at once (the arch would refuse biases next)
        biases = fam.gguf_arch and facts.out_biases - ARCHS[fam.gguf_arch].out_biases
        hint = "; prune with --allocator uniform" + (" and --no-reconstruct" if biases else "") + " to export it"
    raise FormatUnsupported(f"cannot export this {fam.name} checkpoint to GGUF: {'; '.join(reasons)}{hint}")


def _keep_layers(src: _Source, arch: Arch, heads, kvs, ffs, layout: Layout) -> dict:
    """Which layers the GGUF holds (deci drops identity layers and may need a zero layer in front), and the
    constant output of removed blocks folded into earlier output biases. Returns {(gguf layer, "o"|"down"): vec}."""
    n_layer, hidden = len(heads), src.hidden
    const = {}
    for i in range(n_layer):
        for role, width in (("o", heads[i]), ("down", ffs[i])):
            name = removed_block_bias(src.fam, role, i)
            if not width and name in src.names:
                const[(i, role)] = name
    kept = [i for i in range(n_layer) if heads[i] or ffs[i]]
    if not kept:
        raise EdgePruneError("every decoder layer is empty (no attention and no MLP): nothing to export")
    before = any(i < kept[0] for i, _ in const)
    layout.zero_layer = arch.removed_blocks and (heads[kept[0]] == 0 or before)
    if layout.zero_layer:
        layout.layers.append(LayerShape(-1, 1, 1, PLACEHOLDER_FFN, 0))
    out_bias: dict[tuple[int, str], np.ndarray] = {}
    last = (0, "down") if layout.zero_layer else None

    def fold(i: int, role: str) -> None:
        if (i, role) in const:
            assert last is not None
            vec = src.get(const[(i, role)], (hidden,))()
            out_bias[last] = out_bias.get(last, 0) + vec
            into = gguf_name("o" if last[1] == "o" else "down", last[0], "bias")
            layout.folded.append({"from": f"layer {i} {'attention' if role == 'o' else 'mlp'}", "into": into})

    for i in range(n_layer):
        if not heads[i] and not ffs[i]:
            fold(i, "o")
            fold(i, "down")
            continue  # identity layer: left out
        j = len(layout.layers)
        layout.layers.append(LayerShape(i, heads[i], kvs[i], ffs[i] or PLACEHOLDER_FFN, ffs[i]))
        if not heads[i]:
            fold(i, "o")
        if not ffs[i] and (i, "down") in const:
            out_bias[(j, "down")] = src.get(const[(i, "down")], (hidden,))()
        last = (j, "down")
    return out_bias


def plan(ckpt: Path, cfg: dict, fam: Family, st: Tensors) -> Layout:
    """Decide architecture, per-layer shapes, hyper-parameters and tensors (lazy); validate every tensor's shape."""
    hidden, n_layer, heads, kvs, ffs = unit_dims(cfg)
    head_dim = int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"]))
    rope = rope_parameters(cfg)
    n_rot = _n_rot(cfg, fam, head_dim, rope)
    src = _Source(st, fam, hidden, head_dim)
    emb = src.name("embed", None)[0]
    if emb not in src.names:
        raise EdgePruneError(f"checkpoint is missing tensor {emb}")
    n_vocab = st.shape(emb)[0]
    arch = choose_arch(fam, _facts(cfg, fam, src, hidden, head_dim, n_rot, heads, kvs, ffs))
    L = Layout(arch.name, fam.name, hidden, head_dim, n_rot, n_vocab, n_layer, [], rope=rope)
    out_bias = _keep_layers(src, arch, heads, kvs, ffs, L)
    add = L.tensors.append
    add(OutTensor(gguf_name("embed"), (n_vocab, hidden), src.get(emb, (n_vocab, hidden)), True))
    add(OutTensor(gguf_name("final_norm"), (hidden,), _norm(src, fam, "final_norm", None, (hidden,)), False))
    L.tied = not src.has("lm_head", None)
    if not L.tied:
        add(OutTensor(gguf_name("lm_head"), (n_vocab, hidden), src.role("lm_head", None, (n_vocab, hidden)), True))
    if rope["rope_type"] == "llama3":
        if gguf.TENSOR_NAMES[T.ROPE_FREQS] not in arch_tensors(arch.name):
            raise EdgePruneError(f"llama3 RoPE scaling cannot be written for llama.cpp's {arch.name}")
        factors = llama3_rope_factors(rope, n_rot, cfg)
        add(OutTensor(gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", factors.shape, lambda: factors, False))
    q_scale = _query_scale(cfg, fam, arch, hidden, head_dim, L.layers[0].heads)
    for j, layer in enumerate(L.layers):
        _layer_tensors(src, fam, arch, L, j, layer, out_bias, q_scale)
    for i in range(n_layer):  # norms of removed blocks are unused by HF as well
        for role in NORM_ROLES:
            if fam.has_role(role) and (not heads[i] and role in _ATTN_NORMS or not ffs[i] and role in _MLP_NORMS):
                src.used.add(src.name(role, i)[0])
    unknown = sorted(src.names - src.used - {n for n in src.names if n.endswith("rotary_emb.inv_freq")})
    if unknown:
        raise EdgePruneError(f"checkpoint has tensors the GGUF writer does not know: {', '.join(unknown[:5])}")
    L.kv = hyperparameters(cfg, fam, arch, L)
    return L


_ATTN_NORMS = ("attn_norm", "attn_post_norm", "q_norm", "k_norm")
_MLP_NORMS = ("mlp_norm", "mlp_post_norm")


def _norm(src: _Source, fam: Family, role: str, i: int | None, shape, scale: float = 1.0):
    return src.role(role, i, shape, transform=lambda w: (w + fam.norm_offset) * scale)


def _query_scale(cfg: dict, fam: Family, arch: Arch, hidden: int, head_dim: int, n_head0: int) -> float:
    """Factor folded into the q norm so that llama.cpp's fixed query scale gives the model's (Gemma 3)."""
    qpas = cfg.get("query_pre_attn_scalar")
    if qpas is None or not fam.has_role("q_norm"):
        return 1.0
    # llama.cpp's gemma3 scales by 1/sqrt(head_dim), or by 1/sqrt(hidden / layer 0's heads) for 62 layers (27B)
    base = hidden / n_head0 if arch.name == "gemma3" and int(cfg["num_hidden_layers"]) == 62 else head_dim
    return float(np.sqrt(base / float(qpas)))


def _layer_tensors(src: _Source, fam: Family, arch: Arch, L: Layout, j: int, layer: LayerShape, out_bias: dict,
                   q_scale: float) -> None:
    add, hidden, hd, i = L.tensors.append, L.hidden, L.head_dim, layer.src

    def zeros(shape):
        return lambda: np.zeros(shape, dtype=np.float32)

    if i < 0:  # the zero layer in front (see the module docstring)
        add(OutTensor(gguf_name("attn_norm", j), (hidden,), lambda: np.ones(hidden, dtype=np.float32), False))
        for role, shape in (("q", (hd, hidden)), ("k", (hd, hidden)), ("v", (hd, hidden)), ("o", (hidden, hd))):
            add(OutTensor(gguf_name(role, j), shape, zeros(shape), True))
    elif layer.heads:
        dims = (layer.heads, layer.kv_heads, layer.hf_ffn)
        permute = fam.rope_interleaved == arch.rope_neox  # the two RoPE layouts differ

        def rot(n_head):
            if not permute:
                return None
            order = rope_perm(hd, L.n_rot, to_pairs=not arch.rope_neox)
            return lambda a: a.reshape(n_head, hd, *a.shape[1:])[:, order].reshape(a.shape)

        add(OutTensor(gguf_name("attn_norm", j), (hidden,), _norm(src, fam, "attn_norm", i, (hidden,)), False))
        for role, n_head, perm in (("q", layer.heads, rot(layer.heads)), ("k", layer.kv_heads, rot(layer.kv_heads)),
                                   ("v", layer.kv_heads, None)):
            rows = n_head * hd
            add(OutTensor(gguf_name(role, j), (rows, hidden), src.role(role, i, (rows, hidden), dims, transform=perm),
                          True))
            if src.has(role, i, "bias"):
                add(OutTensor(gguf_name(role, j, "bias"), (rows,),
                              src.role(role, i, (rows,), dims, "bias", perm), False))
        for role, scale in (("q_norm", q_scale), ("k_norm", 1.0)):
            if fam.has_role(role):
                perm = rot(1)
                load = _norm(src, fam, role, i, (hd,), scale)
                add(OutTensor(gguf_name(role, j), (hd,), (lambda ld=load, p=perm: p(ld())) if perm else load, False))
        q = layer.heads * hd
        add(OutTensor(gguf_name("o", j), (hidden, q), src.role("o", i, (hidden, q), dims), True))
        _out_bias(src, L, "o", i, j, out_bias.get((j, "o")))
        if fam.has_role("attn_post_norm"):
            add(OutTensor(gguf_name("attn_post_norm", j), (hidden,), _norm(src, fam, "attn_post_norm", i, (hidden,)),
                          False))
    n, dims = layer.ffn, (layer.heads, layer.kv_heads, layer.hf_ffn)
    if not layer.hf_ffn:  # deci's placeholder FFN (see the module docstring)
        add(OutTensor(gguf_name("mlp_norm", j), (hidden,), lambda: np.ones(hidden, dtype=np.float32), False))
        for role, shape in (("gate", (n, hidden)), ("up", (n, hidden)), ("down", (hidden, n))):
            add(OutTensor(gguf_name(role, j), shape, zeros(shape), True))
        _out_bias(src, L, "down", None, j, out_bias.get((j, "down")))
        return
    add(OutTensor(gguf_name("mlp_norm", j), (hidden,), _norm(src, fam, "mlp_norm", i, (hidden,)), False))
    gate, up = src.role("gate", i, (n, hidden), dims), src.role("up", i, (n, hidden), dims)
    if arch.fused_gate_up:
        add(OutTensor(gguf_name("up", j), (2 * n, hidden), lambda: np.concatenate([gate(), up()]), True))
    else:
        add(OutTensor(gguf_name("gate", j), (n, hidden), gate, True))
        add(OutTensor(gguf_name("up", j), (n, hidden), up, True))
    add(OutTensor(gguf_name("down", j), (hidden, n), src.role("down", i, (hidden, n), dims), True))
    _out_bias(src, L, "down", i, j, out_bias.get((j, "down")))
    if fam.has_role("mlp_post_norm"):
        add(OutTensor(gguf_name("mlp_post_norm", j), (hidden,), _norm(src, fam, "mlp_post_norm", i, (hidden,)),
                      False))


def _out_bias(src: _Source, L: Layout, role: str, i: int | None, j: int, extra) -> None:
    """``blk.j.attn_output.bias`` / ``ffn_down.bias``: the checkpoint's own bias plus folded constants."""
    own = src.get(src.name(role, i, "bias")[0], (L.hidden,)) if i is not None and src.has(role, i, "bias") else None
    if own is None and extra is None:
        return

    def load():
        v = own() if own is not None else np.zeros(L.hidden, dtype=np.float32)
        return v + extra if extra is not None else v

    L.tensors.append(OutTensor(gguf_name(role, j, "bias"), (L.hidden,), load, False))
