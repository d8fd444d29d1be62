"""Converting and quantizing a float32 ONNX graph: onnxruntime's transformer optimizer, float16, and the INT8
recipes (weight-only ``MatMulNBits`` blocks, ``DynamicQuantizeMatMul``, onnxruntime's ``quantize_dynamic``).
Weights are read from the source graph's external data one tensor at a time.

It does not trace a model (``onnx_trace.py``), smooth one (``onnx_smooth.py``) or check the result against
PyTorch (``onnx_check.py``).
"""

from __future__ import annotations

from pathlib import Path

from edgeprune.export.onnx_files import EXTERNAL_DATA_BYTES, file_bytes, quiet, save_model
from edgeprune.export.onnx_weights import internalise, load_tensor

from edgeprune.errors import EdgePruneError

# INT8 recipes (see quantize_int8); the default is the measured choice
INT8_RECIPES = ("nbits8", "nbits8-b64", "smooth-hybrid", "dynamic", "dynamic-excl")
DEFAULT_INT8 = "nbits8"
NBITS_BLOCK = 32
NBITS_ACCURACY = 4


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
    with quiet():
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
    with quiet():
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
    ``block_size``). A tied lm_head (its MatMul weight is the embedding transposed: a Transpose node of the
    table, or a second initializer after a full trace) quantized as ``"nbits"`` at 8 bits shares one quantized
    table with the embedding: the table is stored once, in MatMulNBits' layout, which GatherBlockQuantized reads
    as [vocab, blocks, block] (see ``_tied_head``). A MatMul reading a Transpose of a table that cannot be
    shared is quantized from the transposed table.
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
    new_nodes, added = [], []
    counts = {"nbits": 0, "dynamic": 0, "float": 0, "embedding": 0}
    flipped = _transposed_tables(graph, inits)
    tied = (_tied_head(graph, inits, flipped, src.parent, choose, block_size)
            if embedding and bits == 8 and symmetric else None)
    if tied is not None:  # the transposed copy replaces the table (one float copy in memory, not two)
        packed, scales, _ = _pack(packers[bits], np.ascontiguousarray(tied.pop("table").T), bits, block_size,
                                  symmetric)
        added += [numpy_helper.from_array(packed, tied["data"]),
                  numpy_helper.from_array(scales, tied["scales"]),
                  numpy_helper.from_array(np.array([*scales.shape, 1], dtype=np.int64), tied["scales"] + "_3d"),
                  numpy_helper.from_array(np.array([packed.shape[1] * block_size], dtype=np.int64),
                                          tied["data"] + "_hidden")]
        del packed
    for node in graph.node:
        w, flip = _matmul_weight(node, inits, flipped)
        if tied is not None and node.name == tied["matmul"]:
            cols, rows = tied["shape"]  # the table is [N, K]
            uses[node.input[1]] -= 1
            new_nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], tied["data"], tied["scales"]], list(node.output),
                name=f"{node.name}_Q", domain="com.microsoft", K=rows, N=cols, bits=bits, block_size=block_size,
                **({"accuracy_level": accuracy_level} if accuracy_level else {})))
            counts["nbits"] += 1
            continue
        if w is not None and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            how = choose(node.name)
            if how not in ("nbits", "dynamic"):
                new_nodes.append(node)
                counts["float"] += 1
                continue
            stored = np.asarray(load_tensor(w, src.parent), dtype=np.float32)  # no copy of a float32 map
            weight = stored.T if flip else stored  # K x N
            rows, cols = weight.shape
            key = f"{w.name}_T" if flip else w.name
            name = f"{node.name or key}_Q"
            if how == "nbits":
                packed, scales, zero = _pack(packers[bits], weight, bits, block_size, symmetric)
                ins = [node.input[0], f"{key}_Q{bits}", f"{key}_scales"]
                added += [numpy_helper.from_array(packed, ins[1]),
                          numpy_helper.from_array(scales.reshape(-1), ins[2])]
                if not symmetric:
                    ins.append(f"{key}_zero_points")
                    added.append(numpy_helper.from_array(zero.reshape(-1), ins[3]))
                attrs = {"K": rows, "N": cols, "bits": bits, "block_size": block_size}
                if accuracy_level:
                    attrs["accuracy_level"] = accuracy_level
                new_nodes.append(helper.make_node("MatMulNBits", ins, list(node.output), name=name,
                                                  domain="com.microsoft", **attrs))
            else:
                qmax = 2 ** (dynamic_bits - 1) - 1
                scale = np.abs(weight).max(axis=0) / qmax
                scale[scale == 0] = 1.0
                q = np.clip(np.rint(weight / scale), -qmax, qmax).astype(np.int8)
                ins = [node.input[0], f"{key}_int8", f"{key}_scale"]
                added += [numpy_helper.from_array(q, ins[1]), numpy_helper.from_array(scale.astype(np.float32), ins[2])]
                new_nodes.append(helper.make_node("DynamicQuantizeMatMul", ins, list(node.output), name=name,
                                                  domain="com.microsoft"))
            uses[node.input[1]] -= 1
            counts[how] += 1
            continue
        if tied is not None and node.name == tied["gather"]:
            new_nodes += _shared_gather(helper, node, tied, block_size)
            uses[node.input[0]] -= 1
            counts["embedding"] += 1
            continue
        e = inits.get(node.input[0]) if node.op_type == "Gather" and embedding else None
        if (e is not None and len(e.dims) == 2 and e.data_type == onnx.TensorProto.FLOAT
                and e.dims[1] % block_size == 0 and not any(a.name == "axis" and a.i != 0 for a in node.attribute)):
            table = np.asarray(load_tensor(e, src.parent), dtype=np.float32)
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
    # a Transpose of a table that nothing reads any more (its MatMul was quantized from the table) goes too
    dropped = {id(n) for n in new_nodes if n.op_type == "Transpose" and n.output[0] in flipped
               and uses.get(n.output[0], 0) == 0}
    for n in new_nodes:
        if id(n) in dropped:
            uses[n.input[0]] -= 1
    new_nodes = [n for n in new_nodes if id(n) not in dropped]
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
            "float_matmuls": counts["float"], "quantized_embeddings": counts["embedding"],
            "shared_tied_head": tied is not None}


def _pack(packer, weight, bits: int, block_size: int, symmetric: bool):
    """onnxruntime's MatMulNBits packing of a K x N float weight: (packed [N, blocks, block bytes] uint8,
    scales [N, blocks] float32, zero points)."""
    import numpy as np

    rows, cols = weight.shape
    kpack = 8 // bits
    k_blocks = -(-rows // block_size)
    if k_blocks * block_size != rows:  # np.pad copies even when it adds nothing
        weight = np.pad(weight, ((0, k_blocks * block_size - rows), (0, 0)))
    weight = np.ascontiguousarray(weight)
    packed = np.zeros((cols, k_blocks, -(-block_size // kpack)), dtype=np.uint8)
    zero = np.zeros((cols, -(-k_blocks // kpack)), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    packer(packed, weight, scales, zero, block_size, cols, rows, symmetric)
    return packed, scales, zero


def _transposed_tables(graph, inits: dict) -> dict:
    """{output of a Transpose node (perm 1, 0) of a 2-D float initializer: that initializer}: a MatMul weight
    written as its transpose's table (a tied lm_head, ``attach_weights``)."""
    import onnx

    return {n.output[0]: inits[n.input[0]] for n in graph.node
            if n.op_type == "Transpose" and n.input and n.input[0] in inits
            and [list(a.ints) for a in n.attribute if a.name == "perm"] == [[1, 0]]
            and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT}


def _matmul_weight(node, inits: dict, flipped: dict):
    """(the initializer a MatMul's constant weight comes from, whether it is stored transposed) or (None, False)."""
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None, False
    if node.input[1] in inits:
        return inits[node.input[1]], False
    if node.input[1] in flipped:
        return flipped[node.input[1]], True
    return None, False


def _tied_head(graph, inits: dict, flipped: dict, base: Path, choose, block_size: int) -> dict | None:
    """The embedding Gather and the lm_head MatMul of a tied model, if ``choose`` quantizes the MatMul as
    ``"nbits"`` and its weight is the embedding table transposed: through a Transpose node of the table
    (``flipped``, ``_transposed_tables``: the graph ``attach_weights`` writes; the Transpose goes once nothing
    reads it) or as its own initializer (a full trace; compared element by element, not guessed from the
    shapes). With the table (float32), its shape and the names of the shared initializers. None otherwise, and
    for a hidden size that is not a whole number of blocks (GatherBlockQuantized needs whole blocks)."""
    import numpy as np
    import onnx

    gathers = [n for n in graph.node if n.op_type == "Gather" and n.name and n.input[0] in inits
               and not any(a.name == "axis" and a.i != 0 for a in n.attribute)]  # named: matched by name below
    readers: dict[str, list] = {}
    for n in graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    for g in gathers:
        e = inits[g.input[0]]
        if len(e.dims) != 2 or e.data_type != onnx.TensorProto.FLOAT or e.dims[1] % block_size:
            continue
        found = {"gather": g.name, "shape": (int(e.dims[0]), int(e.dims[1])),
                 "data": f"{e.name}_Q8_shared", "scales": f"{e.name}_scales_shared"}
        for head in graph.node:
            if (head.op_type == "MatMul" and head.name and len(head.input) == 2 and flipped.get(head.input[1]) is e
                    and len(readers[head.input[1]]) == 1 and choose(head.name) == "nbits"):
                return {**found, "matmul": head.name, "table": np.asarray(load_tensor(e, base), dtype=np.float32)}
        heads = [n for n in graph.node if n.op_type == "MatMul" and n.name and len(n.input) == 2 and n.input[1] in inits
                 and list(inits[n.input[1]].dims) == [e.dims[1], e.dims[0]] and choose(n.name) == "nbits"]
        if len(heads) != 1:
            continue
        table = np.asarray(load_tensor(e, base), dtype=np.float32)
        head = load_tensor(inits[heads[0].input[1]], base)
        rows = 4096  # compared in slices: no full-size boolean temporary
        if not all(np.array_equal(head[:, i:i + rows].T, table[i:i + rows]) for i in range(0, len(table), rows)):
            continue
        return {**found, "matmul": heads[0].name, "table": table}
    return None


def _shared_gather(helper, node, tied: dict, block_size: int) -> list:
    """The embedding lookup on the shared table: GatherBlockQuantized over [vocab, blocks, block] with the scales
    reshaped to [vocab, blocks, 1], then the rows reshaped back to [..., hidden]."""
    out, name = node.output[0], node.name or tied["data"]
    ids = node.input[1]
    return [
        helper.make_node("Reshape", [tied["scales"], tied["scales"] + "_3d"], [f"{name}_scales3d"],
                         name=f"{name}_scales3d"),
        helper.make_node("GatherBlockQuantized", [tied["data"], ids, f"{name}_scales3d"], [f"{name}_blocks"],
                         name=f"{name}_Q", domain="com.microsoft", bits=8, block_size=block_size, gather_axis=0,
                         quantize_axis=2),
        helper.make_node("Shape", [ids], [f"{name}_ids_shape"], name=f"{name}_ids_shape"),
        helper.make_node("Concat", [f"{name}_ids_shape", tied["data"] + "_hidden"], [f"{name}_out_shape"],
                         name=f"{name}_out_shape", axis=0),
        helper.make_node("Reshape", [f"{name}_blocks", f"{name}_out_shape"], [out], name=f"{name}_rows"),
    ]


def quantize_dyn(src: Path, dst: Path, per_channel: bool = False, exclude: tuple[str, ...] = (),
                 reduce_range: bool = False) -> dict:
    """onnxruntime ``quantize_dynamic``: int8 weights (onnxruntime forces 7-bit range for MatMulInteger weights)
    and uint8 activations quantized per tensor at run time. Only MatMuls with a constant weight (so a tied
    lm_head, a Transpose of the embedding, stays float); ``exclude``: node-name substrings to leave in float."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(src), load_external_data=False)
    nodes = [n.name for n in proto.graph.node if n.op_type == "MatMul" and any(x and x in n.name for x in exclude)]
    with quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                         reduce_range=reduce_range, op_types_to_quantize=["MatMul"], nodes_to_exclude=nodes,
                         use_external_data_format=file_bytes(src) > EXTERNAL_DATA_BYTES,
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
