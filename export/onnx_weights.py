"""Weights of a traced ONNX graph, written one tensor at a time into external data.

torch's TorchScript exporter builds the whole ModelProto with every weight inside it and then serialises it: the
torch model, the constant-folded (transposed) copy of every linear weight, the C++ proto and its serialised bytes
were resident together (5.5x the float32 weights for SmolLM2-135M, see README "Export at scale"). The exporter can
trace without parameters (``export_params=False``): the graph then takes every weight as a graph input, named
either by its state-dict name (norms, embeddings, biases) or, for a constant-folded ``W^T`` that feeds a MatMul,
``onnx::MatMul_N`` with the MatMul node named after the module (``/model/model/layers.0/self_attn/q_proj/MatMul``),
or for a family whose norms compute ``x * (1 + w)`` (Gemma), ``onnx::Mul_N`` for the folded ``1 + w``.
``attach_weights`` resolves each such input to its torch tensor, writes the tensors in turn to ``<model>.data``
and turns the inputs into external-data initializers, so besides the torch model only one tensor is in flight.
A folded ``W^T`` whose ``W`` is itself a weight input (a tied lm_head) is not written again: a Transpose node of
the table stands for it.

It does not trace, quantize or decide the final single-file/external-data layout (export/onnx.py does), and
raises ``UnresolvedWeight`` for a graph input it cannot map (the caller falls back to a full trace).
"""

from __future__ import annotations

from pathlib import Path

ALIGN = 4096  # offsets aligned as onnx's own external-data writer does for mmap-friendly reads


class UnresolvedWeight(Exception):
    """A graph input that is neither a declared model input nor a resolvable weight."""


def _shape(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _module_path(node) -> str:
    """The module a node is named after: ``/model/model/layers.0/self_attn/q_proj/MatMul`` ->
    ``model.model.layers.0.self_attn.q_proj``."""
    return node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")


def _readers(name: str, consumers: dict) -> list:
    """(node, the input name it reads) for every node that reads ``name``, through Identity nodes: the exporter
    feeds one input to several places through Identities when it deduplicated equal folded constants."""
    out = []
    for node in consumers.get(name, []):
        if node.op_type == "Identity":
            out += _readers(node.output[0], consumers)
        else:
            out.append((node, name))
    return out


def _candidate(root, node, read: str, norm_offset: float):
    """The tensor ``node`` reading ``read`` stands for, or None: a folded ``W^T`` of the MatMul's module; with a
    norm offset, the folded ``norm_offset + w`` of the 1-D weight of the Mul's module."""
    import torch

    try:
        weight = root.get_submodule(_module_path(node)).weight
    except AttributeError:
        return None
    if not isinstance(weight, torch.Tensor):
        return None
    if node.op_type == "MatMul" and node.input[1] == read and weight.dim() == 2:
        return weight.t()
    if node.op_type == "Mul" and norm_offset and weight.dim() == 1:
        return weight.float() + norm_offset
    return None


def _resolve(state: dict, root, name: str, consumers: dict, norm_offset: float = 0.0) -> object:
    """The torch tensor a weight input stands for: a state-dict entry by name; else what every node reading it
    stands for (``_candidate``: a transposed MatMul weight; for a family whose norms compute
    ``x * (norm_offset + w)``, Gemma's 1 + w, the folded norm weight), provided they all agree. A wrong guess
    cannot publish: the shapes are checked here and the values by the export's parity check."""
    import torch

    if name in state:
        return state[name]
    readers = _readers(name, consumers)
    found = [_candidate(root, node, read, norm_offset) for node, read in readers]
    if found and all(t is not None for t in found):
        first = found[0]
        if all(t.shape == first.shape and (t is first or torch.equal(t, first)) for t in found[1:]):
            return first
    raise UnresolvedWeight(name)


def attach_weights(proto, root, path: Path, n_inputs: int, norm_offset: float = 0.0) -> dict:
    """Move graph inputs after the first ``n_inputs`` (the model's real inputs) into initializers whose data is
    written tensor by tensor from ``root`` (the traced torch module) to ``path.data``; save the graph to ``path``.
    ``norm_offset``: the family's RMSNorm offset (``x * (norm_offset + w)``; see ``_resolve``).
    Returns {"weight_bytes", "tensors"}."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper

    path = Path(path)
    data = path.with_name(path.name + ".data")
    graph = proto.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    weights = list(graph.input[n_inputs:])
    state = dict(root.named_parameters(remove_duplicate=False)) | dict(root.named_buffers())
    sources = {vi.name: _resolve(state, root, vi.name, consumers, norm_offset) for vi in weights}
    tied = _transposed_twins(weights, sources)
    offset = 0
    inits = []
    with open(data, "wb") as f, torch.no_grad():
        for vi in weights:
            if vi.name in tied:
                continue
            t = sources[vi.name]
            if list(t.shape) != _shape(vi):
                raise UnresolvedWeight(f"{vi.name}: graph shape {_shape(vi)}, tensor {list(t.shape)}")
            dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            arr = np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy().astype(dtype, copy=False))
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(memoryview(arr).cast("B"))  # no bytes copy of the tensor (tobytes made one)
            init = TensorProto(name=vi.name, data_type=vi.type.tensor_type.elem_type, dims=arr.shape,
                               data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                init.external_data.add(key=k, value=v)
            inits.append(init)
            offset += arr.nbytes
            del arr
    del graph.input[n_inputs:]
    graph.initializer.extend(inits)
    for i, (name, base) in enumerate(sorted(tied.items())):  # before every reader: the graph stays sorted
        graph.node.insert(i, helper.make_node("Transpose", [base], [name], name=f"/tied_head/Transpose_{i}",
                                              perm=[1, 0]))
    onnx.save_model(proto, str(path))
    return {"weight_bytes": offset, "tensors": len(inits), "shared_tied_head": bool(tied)}


def _transposed_twins(weights: list, sources: dict) -> dict:
    """{input: the input it is the transpose of}, for a folded ``W^T`` whose ``W`` is itself a weight input (same
    storage: a tied lm_head is the embedding). Such an input is written once; a Transpose node makes the other
    (onnxruntime folds it when the session is created), so the file holds the table once."""
    whole = {}
    for vi in weights:
        t = sources[vi.name]
        if t.dim() == 2 and t.is_contiguous():
            whole.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), vi.name)
    twins = {}
    for vi in weights:
        t = sources[vi.name]
        if t.dim() == 2 and not t.is_contiguous() and t.stride() == (1, t.shape[0]):
            base = whole.get((t.untyped_storage().data_ptr(), t.storage_offset(), (t.shape[1], t.shape[0])))
            if base is not None and base != vi.name:
                twins[vi.name] = base
    return twins


def load_tensor(tensor, base_dir: Path):
    """One initializer as a numpy array, reading only its own bytes when it lives in external data: there a
    read-only memory map of those bytes (onnx's reader holds the bytes and an array copy of them at once, 2x a
    weight that can be 0.7 GB, the tied embedding of a 262k vocabulary); a proto-held tensor through onnx."""
    import math
    import sys

    import numpy as np
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import uses_external_data

    if uses_external_data(tensor) and sys.byteorder == "little":
        info = {e.key: e.value for e in tensor.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(int(d) for d in tensor.dims)
        location = info.get("location", "")
        size = math.prod(shape) * dtype.itemsize
        if (dtype.kind in "fiu" and location and Path(location).name == location
                and int(info.get("length", size)) == size and size > 0):
            return np.memmap(Path(base_dir) / location, dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                             shape=shape)
    return numpy_helper.to_array(tensor, base_dir=str(base_dir))


def internalise(tensor, base_dir: Path) -> None:
    """Read an external-data initializer's bytes into the proto (for a graph saved without its data file)."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(tensor):
        load_external_data_for_tensor(tensor, str(base_dir))
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]
