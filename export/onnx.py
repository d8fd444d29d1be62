"""Export dense and pruned checkpoints to ONNX with a KV cache, check parity, and quantize.

Graph interface (the names optimum and onnxruntime-genai use):

- inputs ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, past+seq] int64 (1 = real token, 0 = padding),
  ``position_ids`` [batch, seq] int64, and for every layer ``i`` that has attention
  ``past_key_values.{i}.key`` / ``past_key_values.{i}.value`` [batch, kv_heads_i, past, head_dim];
- outputs ``logits`` [batch, seq, vocab] float32 and ``present.{i}.key`` / ``present.{i}.value``
  [batch, kv_heads_i, past+seq, head_dim].

Batch, sequence and past length are dynamic; the first step feeds past tensors with past length 0. Each layer's
past tensors carry that layer's own KV head count (pruned models differ per layer): runtimes must read the head
counts from the graph's inputs, not from ``config.json``. A layer whose attention block was removed (0 heads) has
no past/present tensors at all: a 0-head tensor carries nothing, and zero-sized inputs trip up several runtimes.
Layer indices in the names are the decoder-layer indices, so they may have gaps (``past_key_values.2.*`` absent
when layer 2 has no attention). The past length is whatever the past tensors hold; the graph never reads it from
a layer without attention.

The exporter is torch's TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) applied to a small wrapper
module: it takes the flat past tensors, builds a transformers ``DynamicCache`` from them, runs the unmodified
Hugging Face model and returns logits and the flat presents. The wrapper builds the 4-D additive attention mask
itself (causal + padding, + sliding window where the family uses one) and hands it to the model, so no
data-dependent branch of transformers' mask code is baked into the trace. (The dynamo exporter needs
``onnxscript``, which is not a dependency.)
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeprune.export.onnx_weights import UnresolvedWeight, attach_weights, internalise, load_tensor
from edgeprune.export.parity import ParityRecord, describe, first_divergence, kl_per_position

from edgeprune.errors import EdgePruneError, first_line

ONNX_DTYPES = ("fp32", "fp16", "int8")
OPSET = 17
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# protobuf refuses messages of 2 GiB; keep a margin for the graph itself
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2
COPY_FILES = ("config.json", "generation_config.json", "modeling_edgeprune.py")
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The history of the region begins in the early Middle Ages, when small farming communities settled along the "
    "river. Over the following centuries the towns grew into trading centres, and by the seventeenth century",
)
# Parity tolerances against PyTorch (float32), per exported dtype.
# Max abs logit difference, measured on SmolLM2-135M (logits up to ~35): fp32 8e-5, fp16 0.04, int8 nbits8 1.8,
# on a pruned SmolLM2 3.8 (a max over 49152 logits at every position is a harsh measure for a quantized model);
# per-tensor dynamic int8 19-23. fp32 leaves room for float32 noise: on a pruned SmolLM2 with residual
# activations ~1e4 PyTorch's own float32 logits differ from float64 by 1.5e-3 (ONNX vs PyTorch: 1.9e-3).
# Real export bugs (mask, positions, cache) give differences of order 1 and also break the greedy/cache checks.
TOLERANCE = {"fp32": 1e-2, "fp16": 0.5, "int8": 8.0}
# Mean KL(PyTorch || ONNX) of the next-token distributions, in nats (fp16/int8 only; close to the NLL, hence
# log-PPL, increase it allows: 0.05 nats ~ 5%). Measured: fp16 1e-5; int8 nbits8 0.007 (dense) / 0.010
# (pruned), nbits8-b64 0.009 / 0.017, smooth-hybrid 0.012 / 0.074; per-tensor dynamic int8 0.66-0.75.
KL_TOLERANCE = {"fp32": None, "fp16": 0.01, "int8": 0.05}
# INT8 recipes (see quantize_int8); the default is the measured choice
INT8_RECIPES = ("nbits8", "nbits8-b64", "smooth-hybrid", "dynamic", "dynamic-excl")
DEFAULT_INT8 = "nbits8"
SMOOTH_ALPHA = 0.75
NBITS_BLOCK = 32
NBITS_ACCURACY = 4
# onnxruntime's transformer optimizer: measured no faster on CPU (onnxruntime fuses the same at load time)
OPTIMIZE_DEFAULT = False


# ---------------------------------------------------------------------------------------------------------------
# the wrapper that torch traces


def _wrapper(model, kv_layers: list[int], spec):
    """``spec``: the family's row of ``edgeprune.adapters.families`` (how it chooses sliding-window layers)."""
    import torch
    from torch import nn
    from transformers import DynamicCache

    config = model.config
    n_layers = config.num_hidden_layers
    head_dim = config.head_dim
    window = getattr(config, "sliding_window", None)
    if spec.sliding_window == "use_sliding_window" and not getattr(config, "use_sliding_window", False):
        window = None
    if not spec.sliding_window:
        window = None
    layer_types = list(getattr(config, "layer_types", None) or [])

    class OnnxWrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            b, q = input_ids.shape
            dtype = self.model.model.embed_tokens.weight.dtype
            kv = attention_mask.shape[1]
            # causal by index in the key sequence (the queries are its last q entries), plus padding
            k_idx = torch.arange(kv, device=input_ids.device).view(1, kv)
            q_idx = (torch.arange(q, device=input_ids.device) + (kv - q)).view(q, 1)
            allowed = k_idx <= q_idx
            pad = attention_mask.to(torch.bool).view(b, 1, 1, kv)
            full = allowed.view(1, 1, q, kv) & pad
            neg = torch.finfo(dtype).min

            def additive(m):
                return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, neg)

            mask = additive(full)
            if window:
                sliding = additive(full & (q_idx - k_idx < window).view(1, 1, q, kv))
                if spec.sliding_window == "all":
                    mask = sliding
                elif layer_types:  # the model picks each layer's mask by config.layer_types
                    mask = {"full_attention": mask, "sliding_attention": sliding}
            cache = DynamicCache()
            it = iter(past)
            pos = {i: j for j, i in enumerate(kv_layers)}
            for i in range(n_layers):
                if i in pos:
                    k, v = next(it), next(it)
                else:  # a layer without attention: an empty stand-in, never read
                    k = v = torch.zeros(b, 0, 0, head_dim, dtype=dtype)
                cache.update(k, v, i)
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                             use_cache=True)
            flat = []
            for i in kv_layers:
                layer = cache.layers[i]
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return OnnxWrapper().eval()


class _traceable_rope:
    """GLM's interleaved RoPE repeats cos/sin with ``repeat_interleave``, whose TorchScript ONNX symbolic loses the
    tensor rank (the export then fails in ``cat``). While tracing, the family's ``apply_rotary_pos_emb`` is swapped
    for the same computation written with stack + flatten; the parity check compares against the original."""

    def __init__(self, spec):
        self.mod = None
        if spec.rope_interleaved:
            import importlib

            self.mod = importlib.import_module(f"transformers.models.{spec.hf_module}.modeling_{spec.hf_module}")

    def __enter__(self):
        if self.mod is not None:
            self.old = self.mod.apply_rotary_pos_emb
            self.mod.apply_rotary_pos_emb = _interleaved_rope

    def __exit__(self, *exc):
        if self.mod is not None:
            self.mod.apply_rotary_pos_emb = self.old


def _interleaved_rope(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' GLM ``apply_rotary_pos_emb`` (partial, interleaved pairs), traceable to ONNX."""
    import torch

    def pairs(t):  # (c0, c1, ...) -> (c0, c0, c1, c1, ...) over the first half
        t = t.unsqueeze(unsqueeze_dim)[..., : t.shape[-1] // 2]
        return torch.stack((t, t), dim=-1).flatten(-2)

    def rotate(x):
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)

    cos, sin = pairs(cos), pairs(sin)
    d = cos.shape[-1]
    q_rot, k_rot = q[..., :d], k[..., :d]
    q_embed = torch.cat([q_rot * cos + rotate(q_rot) * sin, q[..., d:]], dim=-1)
    k_embed = torch.cat([k_rot * cos + rotate(k_rot) * sin, k[..., d:]], dim=-1)
    return q_embed, k_embed


def _io_names(kv_layers: list[int]) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in kv_layers for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in kv_layers for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _kv_layout(lm) -> tuple[list[int], list[int]]:
    shapes = lm.adapter.shapes()
    kv_layers = [i for i, s in enumerate(shapes) if s.num_kv_heads > 0]
    return kv_layers, [shapes[i].num_kv_heads for i in kv_layers]


def _export_fp32(lm, path: Path) -> dict:
    """Trace ``lm`` to ``path`` (float32, KV cache)."""
    import warnings

    import onnx
    import torch

    model = lm.model
    model.config.use_cache = True
    kv_layers, kv_heads = _kv_layout(lm)
    head_dim = lm.adapter.head_dim
    wrapper = _wrapper(model, kv_layers, lm.adapter.spec)
    # a left-padded batch with a non-empty past: the traced path is the general one (every size is dynamic)
    b, s, p = 2, 7, 5
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    past = []
    for h in kv_heads:
        past += [torch.randn(b, h, p, head_dim, generator=g), torch.randn(b, h, p, head_dim, generator=g)]
    in_names, out_names = _io_names(kv_layers)
    dyn = {"input_ids": {0: "batch_size", 1: "sequence_length"},
           "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
           "position_ids": {0: "batch_size", 1: "sequence_length"},
           "logits": {0: "batch_size", 1: "sequence_length"}}
    for name in in_names[3:]:
        dyn[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in out_names[1:]:
        dyn[name] = {0: "batch_size", 2: "total_sequence_length"}
    export_kw = dict(dynamo=False, input_names=in_names, output_names=out_names, dynamic_axes=dyn,
                     opset_version=OPSET, do_constant_folding=True)
    scratch = path.parent / ".trace"
    scratch.mkdir()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _traceable_rope(lm.adapter.spec):
            warnings.simplefilter("ignore")
            try:  # the graph alone; its weights are written tensor by tensor (export/onnx_weights.py)
                torch.onnx.export(wrapper, (ids, mask, pos, *past), str(scratch / MODEL_FILE), export_params=False,
                                  **export_kw)
                proto = onnx.load(str(scratch / MODEL_FILE), load_external_data=False)
                weights = attach_weights(proto, wrapper, path, len(in_names))
                how = "graph traced without parameters, weights written tensor by tensor"
            except UnresolvedWeight:  # a graph input we cannot map: trace with the weights inside
                torch.onnx.export(wrapper, (ids, mask, pos, *past), str(scratch / MODEL_FILE), **export_kw)
                weights = save_model(onnx.load(str(scratch / MODEL_FILE), load_external_data=True), path)
                how = "full trace"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"kv_layers": kv_layers, "kv_heads": kv_heads, "head_dim": head_dim, "weights": how,
            "weight_bytes": weights["weight_bytes"]}


def save_model(proto, path: Path) -> dict:
    """Save ``proto`` to ``path``; the weights go to ``model.onnx.data`` beside it when over 2 GB."""
    import onnx

    path = Path(path)
    size = sum(_tensor_bytes(t) for t in proto.graph.initializer)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return {"external_data": size > EXTERNAL_DATA_BYTES, "weight_bytes": size}


def _tensor_bytes(t) -> int:
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL:
        return next((int(e.value) for e in t.external_data if e.key == "length"), 0)
    return len(t.raw_data) or t.ByteSize()


# ---------------------------------------------------------------------------------------------------------------
# graph optimisation, fp16, int8


def optimize_graph(src: Path, dst: Path) -> dict:
    """onnxruntime's transformer optimizer, normalisation fusions only (RMSNorm -> SimplifiedLayerNormalization,
    residual add + RMSNorm -> SkipSimplifiedLayerNormalization). Attention fusion is off: its patterns assume
    one head count for every layer. Measured on SmolLM2-135M (CPU): no faster than the plain graph, whose
    equivalent fusions onnxruntime applies itself when the session is created, so it is off by default."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("gpt2")
    opts.enable_attention = False
    opts.enable_rotary_embeddings = False
    opts.enable_embed_layer_norm = False
    with _quiet():
        opt = optimize_model(str(src), model_type="gpt2", num_heads=0, hidden_size=0, optimization_options=opts,
                             opt_level=0, use_gpu=False)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    save_model(opt.model, dst)
    return {"fused": fused}


def to_fp16(src: Path, dst: Path) -> dict:
    """Weights and compute in float16; the graph's inputs and outputs (logits, KV cache) stay float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src), load_external_data=True)
    with _quiet():
        proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    save_model(proto, dst)
    return {"method": "float16", "keep_io_types": True}


def quantize_nbits(src: Path, dst: Path, bits: int = 8, block_size: int = NBITS_BLOCK,
                   accuracy_level: int = NBITS_ACCURACY, symmetric: bool = True, exclude: tuple[str, ...] = (),
                   embedding: bool = True) -> dict:
    """Weight-only block quantization: every MatMul with a constant 2-D float weight becomes ``MatMulNBits``
    (blocks of ``block_size`` along K, one scale per block), the lm_head included (the tied head is a MatMul with
    a transposed copy of the embedding as its own initializer). ``embedding``: the token embedding's Gather
    becomes ``GatherBlockQuantized`` (8-bit, same blocks) too. ``exclude``: node-name substrings to leave in
    float."""
    def choose(name: str) -> str | None:
        return None if any(x and x in name for x in exclude) else "nbits"

    return quantize_weights(src, dst, choose, bits=bits, block_size=block_size, accuracy_level=accuracy_level,
                            symmetric=symmetric, embedding=embedding)


def quantize_weights(src: Path, dst: Path, choose, bits: int = 8, block_size: int = NBITS_BLOCK,
                     accuracy_level: int = NBITS_ACCURACY, symmetric: bool = True, embedding: bool = True,
                     dynamic_bits: int = 7) -> dict:
    """Quantize the weights of every MatMul with a constant 2-D float weight, as ``choose(node name)`` says:

    - ``"nbits"``: ``MatMulNBits``, weight-only block quantization (blocks of ``block_size`` along K). The RTN
      scheme and C++ packing kernel of onnxruntime's ``MatMulNBitsQuantizer`` (DEFAULT algorithm), applied here
      directly because that module needs ``onnx_ir``. ``accuracy_level`` 4 computes with int8 activations
      (quantized per block at run time); levels 0/1 compute in float32, which for 8-bit weights is a slow path in
      onnxruntime 1.32 (~5x slower per decode step than float32 weights);
    - ``"dynamic"``: ``DynamicQuantizeMatMul`` (what onnxruntime fuses ``quantize_dynamic``'s output into):
      symmetric per-column int8 weights, uint8 activations quantized per tensor at run time. ``dynamic_bits``
      7 is the range onnxruntime's ``quantize_dynamic`` uses so that the u8 x s8 kernels of x86 CPUs without
      VNNI cannot saturate; 8 is more accurate (and safe on VNNI/AMX x86 and on ARM);
    - ``None``: stays float.

    ``embedding``: the token embedding's Gather becomes ``GatherBlockQuantized`` (8-bit, blocks of
    ``block_size``).
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.capi import _pybind_state as C

    packers = {4: C.quantize_matmul_4bits, 8: C.quantize_matmul_8bits}
    if bits not in packers:
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    src = Path(src)
    proto = onnx.load(str(src), load_external_data=False)  # weights are read one at a time (load_tensor)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    kpack = 8 // bits
    new_nodes, added = [], []
    counts = {"nbits": 0, "dynamic": 0, "float": 0, "embedding": 0}
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is not None and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            how = choose(node.name)
            weight = load_tensor(w, src.parent).astype(np.float32)
            rows, cols = weight.shape  # K, N
            name = f"{node.name or w.name}_Q"
            if how == "nbits":
                k_blocks = -(-rows // block_size)
                weight = np.ascontiguousarray(np.pad(weight, ((0, k_blocks * block_size - rows), (0, 0))))
                packed = np.zeros((cols, k_blocks, -(-block_size // kpack)), dtype=np.uint8)
                zero = np.zeros((cols, -(-k_blocks // kpack)), dtype=np.uint8)
                scales = np.zeros((cols, k_blocks), dtype=np.float32)
                packers[bits](packed, weight, scales, zero, block_size, cols, rows, symmetric)
                ins = [node.input[0], f"{w.name}_Q{bits}", f"{w.name}_scales"]
                added += [numpy_helper.from_array(packed, ins[1]),
                          numpy_helper.from_array(scales.reshape(-1), ins[2])]
                if not symmetric:
                    ins.append(f"{w.name}_zero_points")
                    added.append(numpy_helper.from_array(zero.reshape(-1), ins[3]))
                attrs = {"K": rows, "N": cols, "bits": bits, "block_size": block_size}
                if accuracy_level:
                    attrs["accuracy_level"] = accuracy_level
                new_nodes.append(helper.make_node("MatMulNBits", ins, list(node.output), name=name,
                                                  domain="com.microsoft", **attrs))
            elif how == "dynamic":
                qmax = 2 ** (dynamic_bits - 1) - 1
                scale = np.abs(weight).max(axis=0) / qmax
                scale[scale == 0] = 1.0
                q = np.clip(np.rint(weight / scale), -qmax, qmax).astype(np.int8)
                ins = [node.input[0], f"{w.name}_int8", f"{w.name}_scale"]
                added += [numpy_helper.from_array(q, ins[1]), numpy_helper.from_array(scale.astype(np.float32), ins[2])]
                new_nodes.append(helper.make_node("DynamicQuantizeMatMul", ins, list(node.output), name=name,
                                                  domain="com.microsoft"))
            else:
                new_nodes.append(node)
                counts["float"] += 1
                continue
            uses[w.name] -= 1
            counts[how] += 1
            continue
        e = inits.get(node.input[0]) if node.op_type == "Gather" and embedding else None
        if (e is not None and len(e.dims) == 2 and e.data_type == onnx.TensorProto.FLOAT
                and e.dims[1] % block_size == 0 and not any(a.name == "axis" and a.i != 0 for a in node.attribute)):
            table = load_tensor(e, src.parent).astype(np.float32)
            vocab, hidden = table.shape
            blocks = table.reshape(vocab, hidden // block_size, block_size)
            scale = np.abs(blocks).max(axis=-1) / 127.0
            scale[scale == 0] = 1.0
            q = (np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8).reshape(vocab, hidden)
            ins = [f"{e.name}_Q8", node.input[1], f"{e.name}_scales"]
            added += [numpy_helper.from_array(q, ins[0]), numpy_helper.from_array(scale.astype(np.float32), ins[2])]
            new_nodes.append(helper.make_node("GatherBlockQuantized", ins, list(node.output),
                                              name=f"{node.name or e.name}_Q", domain="com.microsoft", bits=8,
                                              block_size=block_size, gather_axis=0, quantize_axis=1))
            uses[e.name] -= 1
            counts["embedding"] += 1
            continue
        new_nodes.append(node)
    keep = [t for t in graph.initializer if uses.get(t.name, 0) > 0]
    for t in keep:  # the float tensors that stay (norms, biases, unquantized weights) move into the graph
        internalise(t, src.parent)
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_model(proto, dst)
    return {"nbits": {"bits": bits, "block_size": block_size, "symmetric": symmetric,
                      "accuracy_level": accuracy_level, "matmuls": counts["nbits"]},
            "dynamic": {"weight_bits": dynamic_bits, "per_channel": True, "matmuls": counts["dynamic"]},
            "float_matmuls": counts["float"], "quantized_embeddings": counts["embedding"]}


def quantize_dyn(src: Path, dst: Path, per_channel: bool = False, exclude: tuple[str, ...] = (),
                 reduce_range: bool = False) -> dict:
    """onnxruntime ``quantize_dynamic``: int8 weights (onnxruntime forces 7-bit range for MatMulInteger weights)
    and uint8 activations quantized per tensor at run time. Only MatMuls with a constant weight; ``exclude``:
    node-name substrings to leave in float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(src), load_external_data=False)
    nodes = [n.name for n in proto.graph.node if n.op_type == "MatMul" and any(x and x in n.name for x in exclude)]
    with _quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         reduce_range=reduce_range, op_types_to_quantize=["MatMul"], nodes_to_exclude=nodes,
                         use_external_data_format=_file_bytes(src) > EXTERNAL_DATA_BYTES,
                         extra_options={"MatMulConstBOnly": True})
    return {"method": "quantize_dynamic", "per_channel": per_channel, "excluded": nodes, "reduce_range": reduce_range}


def sensitive_matmuls(src: Path) -> tuple[str, ...]:
    """Node names of the lm_head and of the down projections of the first and last layers."""
    import onnx

    names = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
    layers = sorted({int(n.split("/layers.")[1].split("/")[0]) for n in names if "/layers." in n and "down_proj" in n})
    out = [n for n in names if "lm_head" in n]
    for i in layers[:1] + layers[-1:]:
        out += [n for n in names if f"/layers.{i}/" in n and "down_proj" in n]
    return tuple(dict.fromkeys(out))


def quantize_int8(src: Path, dst: Path, recipe: str = DEFAULT_INT8) -> dict:
    """The INT8 recipes. PPL on the WikiText-2 test text (first 4096 tokens, seq 128) for SmolLM2-135M
    (fp32 55.05) / a non-uniform pruned SmolLM2 (fp32 95.49), and parity (mean KL to PyTorch):

    - ``nbits8`` (default): MatMulNBits 8-bit on every linear layer and the lm_head, blocks of 32, symmetric,
      int8 compute (accuracy_level 4), 8-bit embedding: 55.17 (+0.2%) / 96.82 (+1.4%), KL 0.007 / 0.010;
    - ``nbits8-b64``: the same with blocks of 64: 55.53 (+0.9%) / 97.21 (+1.8%), KL 0.009 / 0.017;
    - ``smooth-hybrid`` (the graph must come from a model smoothed by ``smooth_model``): dynamic int8
      (per-channel weights, per-tensor activations quantized at run time) on q/k/v/o/gate/up, MatMulNBits on
      down_proj and the lm_head: 55.34 (+0.5%) / 96.63 (+1.2%), about 2x faster prefill than ``nbits8`` on a
      CPU with VNNI/AMX, but calibration-sensitive (7-bit weights or 8 calibration windows: up to +3.0% on the
      pruned model) and far less faithful token by token (KL 0.07 on the pruned model: fails the parity check);
    - ``dynamic``: onnxruntime ``quantize_dynamic`` QInt8 on every MatMul: 101.2 (+84%);
    - ``dynamic-excl``: the same without the lm_head and the first/last down_proj: 90.2 (+64%).
    """
    if recipe == "smooth-hybrid":
        return {"method": "SmoothQuant + DynamicQuantizeMatMul + MatMulNBits",
                **quantize_weights(src, dst, lambda name: "nbits" if _hybrid_nbits(name) else "dynamic",
                                   dynamic_bits=8)}
    if recipe == "nbits8":
        return {"method": "MatMulNBits", **quantize_nbits(src, dst, bits=8, block_size=NBITS_BLOCK,
                                                          accuracy_level=NBITS_ACCURACY)}
    if recipe == "nbits8-b64":
        return {"method": "MatMulNBits", **quantize_nbits(src, dst, bits=8, block_size=64,
                                                          accuracy_level=NBITS_ACCURACY)}
    if recipe == "dynamic":
        return quantize_dyn(src, dst)
    if recipe == "dynamic-excl":
        return quantize_dyn(src, dst, exclude=sensitive_matmuls(src))
    raise EdgePruneError(f"unknown int8 recipe '{recipe}' (expected one of {', '.join(INT8_RECIPES)})")


def _hybrid_nbits(name: str) -> bool:
    """MatMuls kept out of dynamic quantization: down_proj (its input has huge outliers SmoothQuant cannot fold
    away: +70% PPL with dynamic int8) and the lm_head (+3%)."""
    return "down_proj" in name or "lm_head" in name


def smooth_model(lm, alpha: float = SMOOTH_ALPHA, n_samples: int = 16, seq_len: int = 128) -> dict:
    """SmoothQuant, in place: move activation outliers into the weights where a norm can absorb the scale.

    For the attention input (input_layernorm -> q/k/v) and the MLP input (post_attention_layernorm -> gate/up)
    of every layer that has the block: s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) on calibration text
    (edgeprune's builtin text), norm weight / s, W * s. The float model computes the same function; its int8
    activations get a range per-tensor quantization can cover.
    """
    import torch

    from edgeprune.data import calibration_batches, load_text

    batches = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), n_samples, seq_len)
    amax: dict = {}

    def hook(key):
        def record(module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
            amax[key] = torch.maximum(amax[key], x) if key in amax else x
        return record

    hooks = []
    for layer in lm.adapter.layers:
        if layer.has_attention:
            hooks.append(layer.attention_projections().q.register_forward_pre_hook(hook(("attn", layer.index))))
        if layer.has_mlp:
            hooks.append(layer.mlp_projections().gate.register_forward_pre_hook(hook(("mlp", layer.index))))
    try:
        with torch.no_grad():
            for b in range(0, batches.shape[0], 4):
                lm.model(input_ids=batches[b : b + 4], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    blocks = 0
    offset = lm.adapter.spec.norm_offset  # Gemma's RMSNorm scales by (1 + w)
    with torch.no_grad():
        for layer in lm.adapter.layers:
            if layer.has_attention:
                _fold(amax[("attn", layer.index)], layer.attention_input_norm, _qkv(layer), alpha, offset)
                blocks += 1
            if layer.has_mlp:
                _fold(amax[("mlp", layer.index)], layer.mlp_input_norm, _gate_up(layer), alpha, offset)
                blocks += 1
    return {"alpha": alpha, "calibration": list(batches.shape), "blocks": blocks}


def _qkv(layer) -> list:
    a = layer.attention_projections()
    return [a.q, a.k, a.v]


def _gate_up(layer) -> list:
    m = layer.mlp_projections()
    return [m.gate, m.up]


def _fold(act, norm, linears, alpha: float, offset: float = 0.0) -> None:
    """Move a per-channel scale s from the activations into the weights: the norm's effective scale
    (offset + w) is divided by s, the following projections' input columns multiplied by it."""
    import torch

    w = torch.cat([lin.weight.detach().abs() for lin in linears], 0).amax(0).float()
    s = (act.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    norm.weight.copy_((norm.weight + offset) / s.to(norm.weight.dtype) - offset)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def _file_bytes(path: Path) -> int:
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


class _quiet:
    """Silence onnxruntime's chatty Python loggers and warnings for a block."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._levels = {name: logging.getLogger(name).level for name in ("onnxruntime", "")}
        for name in self._levels:
            logging.getLogger(name).setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._w.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------------------------------------------
# public API


def _check_inputs(checkpoint_dir, out_dir, dtype: str) -> tuple[Path, Path]:
    if dtype not in ONNX_DTYPES:
        raise EdgePruneError(f"unknown ONNX dtype '{dtype}' (expected one of {', '.join(ONNX_DTYPES)})")
    src = Path(checkpoint_dir).expanduser()
    if not src.is_dir() or not (src / "config.json").is_file():
        raise EdgePruneError(f"{checkpoint_dir} is not a model directory (no config.json)")
    out = Path(out_dir).expanduser()
    if out.resolve() == src.resolve():
        raise EdgePruneError(f"output directory {out_dir} is the checkpoint directory itself")
    if out.exists() and not out.is_dir():
        raise EdgePruneError(f"output path {out_dir} exists and is not a directory")
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise EdgePruneError(f"output directory {out.resolve().parent} is not writable")
    return src, out


def export_onnx(checkpoint_dir, out_dir, dtype: str = "fp32", optimize: bool | None = None, *,
                int8_recipe: str | None = None, check: bool = True, prompts=None, n_tokens: int = 16) -> dict:
    """Export a checkpoint directory (dense or pruned) to ``out_dir``: ``model.onnx`` (+ ``model.onnx.data``: always
    for fp32, over 2 GB for fp16/int8), tokenizer files, ``config.json``, ``generation_config.json`` and ``manifest.json``.

    ``dtype``: fp32, fp16 (float16 weights and compute, float32 interface) or int8 (``int8_recipe``, default
    ``DEFAULT_INT8``). ``optimize``: run onnxruntime's transformer optimizer (None: ``OPTIMIZE_DEFAULT``, off: it
    measured no faster). The parity check (``check_onnx``) runs before the directory is published; a failed
    check raises ``EdgePruneError`` and leaves nothing behind, as does any other failure. Returns the info dict
    (also written to the manifest), with the check's result under ``parity``.
    """
    src, out = _check_inputs(checkpoint_dir, out_dir, dtype)
    recipe = int8_recipe or DEFAULT_INT8
    if recipe not in INT8_RECIPES:
        raise EdgePruneError(f"unknown int8 recipe '{recipe}' (expected one of {', '.join(INT8_RECIPES)})")
    optimize = OPTIMIZE_DEFAULT if optimize is None else bool(optimize)
    try:
        return _export(src, out, dtype, optimize, recipe, check, prompts, n_tokens)
    except OSError as e:  # disk full, permissions changing under us...: one line, nothing left behind
        raise EdgePruneError(f"ONNX export to {out} failed: {e.strerror or e}") from None


def _export(src: Path, out: Path, dtype: str, optimize: bool, recipe: str, check: bool, prompts,
            n_tokens: int) -> dict:
    from edgeprune.io import MANIFEST, atomic_dir, manifest, write_json
    from edgeprune.models import load

    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        lm = load(str(src))
        cfg = lm.model.config
        info: dict[str, Any] = {"format": "onnx", "file": MODEL_FILE, "dtype": dtype, "opset": OPSET,
                                "exporter": "torch.onnx.export (TorchScript)", "source": str(src),
                                "family": lm.adapter.family, "num_layers": cfg.num_hidden_layers,
                                "vocab_size": cfg.vocab_size, "runtime_versions": _runtime_versions()}
        work = Path(tempfile.mkdtemp(prefix=".work", dir=tmp))
        try:
            current = work / MODEL_FILE  # float32 graph, weights in model.onnx.data beside it
            if dtype == "int8" and recipe == "smooth-hybrid":  # in place: parity reloads the unsmoothed model
                info["smoothing"] = smooth_model(lm)
            try:
                info.update(_export_fp32(lm, current))
            except Exception as e:  # the tracer raises many types; report one line
                raise EdgePruneError(f"ONNX export of {src} failed: {first_line(e)}") from None
            tokenizer = lm.tokenizer
            del lm  # conversion and quantization read the graph's weights from disk, not from torch
            gc.collect()
            if optimize:
                info["optimizer"] = optimize_graph(current, work / "opt.onnx")
                current = work / "opt.onnx"
            info["optimized"] = optimize
            final = tmp / MODEL_FILE
            try:
                if dtype == "fp32":
                    _move_model(current, final)
                elif dtype == "fp16":
                    info["conversion"] = to_fp16(current, final)
                else:
                    info["quantization"] = {"recipe": recipe, **quantize_int8(current, final, recipe)}
            except (EdgePruneError, OSError):
                raise
            except Exception as e:  # onnx/onnxruntime tooling errors: one line, like every other failure
                raise EdgePruneError(f"ONNX {dtype} conversion of {src} failed: {first_line(e)}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        info["external_data"] = (tmp / DATA_FILE).exists()
        info["size_bytes"] = _file_bytes(tmp / MODEL_FILE)
        _copy_side_files(tokenizer, src, tmp)
        if check:
            result = _check(tmp, tokenizer, lambda: load(str(src)).model, prompts, n_tokens, dtype)
            info["parity"] = result
            if not result["passed"]:
                raise EdgePruneError(f"ONNX parity check failed ({dtype}): {describe(result)}")
        info["seconds"] = round(time.perf_counter() - start, 2)
        write_json(tmp / MANIFEST, manifest("onnx-export", **info))
        _publishable(tmp)
    return info


def _runtime_versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _publishable(tmp: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries: give the artifact the permissions a plain mkdir would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)


def _move_model(src: Path, dst: Path) -> None:
    """Publish a graph under ``dst``. Its external data is moved, not rewritten: reading a graph back into one
    file costs about three times its weights in memory (the proto, its serialised bytes, the file read), the
    largest step of a float32 export before (2.2 GB for SmolLM2-135M's 0.54 GB)."""
    data = src.with_name(src.name + ".data")
    if not data.exists():
        os.replace(src, dst)
        return
    if data.name == dst.name + ".data":
        os.replace(data, dst.with_name(data.name))
        os.replace(src, dst)
        return
    import onnx

    save_model(onnx.load(str(src), load_external_data=True), dst)


def _copy_side_files(tokenizer, src: Path, dst: Path) -> None:
    import json

    tokenizer.save_pretrained(dst)
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    # transformers 5 names its fast tokenizer class TokenizersBackend, which transformers 4 (optimum's
    # ORTModelForCausalLM users) does not know; PreTrainedTokenizerFast loads the same tokenizer.json in both
    cfg = dst / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def check_onnx(onnx_dir, checkpoint_dir, prompts=None, n_tokens: int = 16) -> dict:
    """Compare an exported model with the PyTorch checkpoint it came from.

    - ``max_abs_logit_diff``: onnxruntime vs PyTorch logits over every position of each prompt followed by its
      generated tokens, and over a left-padded batch of two prompts (checks attention_mask/position_ids);
    - ``greedy_match``: onnxruntime's greedy tokens (with the KV cache) equal PyTorch's greedy tokens;
    - ``cache_match``: greedy with the cache equals greedy without it (full recomputation) in onnxruntime;
      ``cache_max_abs_logit_diff`` compares the logits of every cached step with the recomputed ones;
    - ``mean_kl``: mean KL divergence (nats) of onnxruntime's next-token distributions from PyTorch's;
    - ``passed``: fp32 needs all of them (logits within ``tolerance``); fp16/int8 need the logits and the cache
      logits within the dtype's ``tolerance`` and ``mean_kl`` within ``kl_tolerance`` (token agreement with
      PyTorch is reported as ``greedy_agreement``, the fraction of tokens before the first divergence, since a
      quantized model may rightly pick another token at a near tie).
    """
    from edgeprune.models import load

    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / MODEL_FILE).is_file():
        raise EdgePruneError(f"{onnx_dir} has no {MODEL_FILE}")
    src = Path(checkpoint_dir)
    if not (src / "config.json").is_file():
        raise EdgePruneError(f"{checkpoint_dir} is not a model directory (no config.json)")
    lm = load(str(src))
    return _check(onnx_dir, lm.tokenizer, lambda: lm.model, prompts, n_tokens, onnx_dtype(onnx_dir))


def onnx_dtype(onnx_dir) -> str:
    """fp32 / fp16 / int8, from the graph's operators and initializers (external data not read)."""
    import onnx

    path = Path(onnx_dir)
    proto = onnx.load(str(path / MODEL_FILE if path.is_dir() else path), load_external_data=False)
    if {n.op_type for n in proto.graph.node} & {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
                                                 "DynamicQuantizeLinear", "GatherBlockQuantized"}:
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


def _ort_outputs(onnx_dir: Path, encoded: list, n_tokens: int) -> tuple[list, object]:
    """onnxruntime's side of the check, run before the PyTorch model is loaded (the two are never resident
    together): per prompt (greedy tokens with the cache, the cached steps' logits, the full forward's logits on
    prompt + generated tokens), and the left-padded batch's logits."""
    import numpy as np
    from edgeprune.devices.ort_generate import OrtGenerator

    gen = OrtGenerator(onnx_dir)
    runs = []
    for ids in encoded:
        new = gen.generate(ids, max_new_tokens=n_tokens, greedy=True, use_cache=True, stop_at_eos=False,
                           keep_logits=True)
        steps = gen.last_logits
        # one full forward each (no cache) on prompt + generated tokens: greedy decoding would reproduce `new`
        # exactly when the argmax at every generated position is the token that was generated there
        full = gen.prefill(np.array([ids + new[:-1]], dtype=np.int64))[0]
        runs.append((new, steps, full))
    padded = None
    if len(encoded) > 1:  # a left-padded batch
        width = max(len(e) for e in encoded[:2])
        ids = np.zeros((2, width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, e in enumerate(encoded[:2]):
            ids[r, width - len(e):], mask[r, width - len(e):] = e, 1
        padded = gen.prefill(ids, attention_mask=mask)
    return runs, padded


def _check(onnx_dir: Path, tokenizer, reference, prompts, n_tokens: int, dtype: str) -> dict:
    """``reference``: a callable returning the PyTorch model, called once onnxruntime's session is gone."""
    import numpy as np
    import torch

    n_tokens = max(int(n_tokens), 1)
    tolerance = TOLERANCE[dtype]
    prompts = list(prompts or DEFAULT_PROMPTS)
    encoded = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) or [0] for p in prompts]
    runs, padded = _ort_outputs(onnx_dir, encoded, n_tokens)
    gc.collect()
    model = reference()
    max_diff = cache_diff = kl_sum = 0.0
    greedy_ok = cache_ok = True
    agree = top1 = positions = 0
    for r, (ids, (new, steps, full)) in enumerate(zip(encoded, runs, strict=True)):
        seq = ids + new[:-1]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float().numpy()
        p = len(ids)
        at = slice(p - 1, p - 1 + len(new))
        max_diff = max(max_diff, float(np.abs(full - ref).max()))
        cache_diff = max(cache_diff, float(np.abs(steps - full[at]).max()))
        cache_ok &= full[at].argmax(-1).tolist() == new
        torch_tokens = ref[at].argmax(-1).tolist()
        greedy_ok &= torch_tokens == new
        mismatch = first_divergence(torch_tokens, new)
        agree += len(new) if mismatch is None else mismatch
        top1 += int((full.argmax(-1) == ref.argmax(-1)).sum())
        kl_sum += float(kl_per_position(ref, full).sum())
        positions += len(seq)
        if padded is not None and r < 2:
            width = padded.shape[1]
            max_diff = max(max_diff, float(np.abs(padded[r, width - p:] - ref[:p]).max()))
    strict = dtype == "fp32"
    mean_kl = kl_sum / max(positions, 1)
    if not strict:
        cache_ok = cache_ok or cache_diff <= tolerance
    passed = (max_diff <= tolerance and cache_diff <= tolerance and cache_ok and (greedy_ok or not strict)
              and (KL_TOLERANCE[dtype] is None or mean_kl <= KL_TOLERANCE[dtype]))
    return ParityRecord(
        runtime="onnxruntime", dtype=dtype, passed=bool(passed), max_abs_logit_diff=max_diff, tolerance=tolerance,
        mean_kl=mean_kl, kl_tolerance=KL_TOLERANCE[dtype], top1_agreement=top1 / max(positions, 1),
        min_top1_agreement=None, greedy_match=bool(greedy_ok), greedy_agreement=agree / (len(encoded) * n_tokens),
        greedy_required=strict, positions=positions, prompts=len(encoded), n_tokens=n_tokens,
        cache_match=bool(cache_ok), cache_max_abs_logit_diff=cache_diff).to_dict()


__all__ = ["ONNX_DTYPES", "check_onnx", "export_onnx"]
