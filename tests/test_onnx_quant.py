"""INT8 weight quantization of an ONNX graph (export/onnx_quant.py) on hand-built graphs: a tied lm_head shares
the embedding's quantized table, an untied one does not, and both give the logits of the float graph."""

from __future__ import annotations

import numpy as np
import pytest

V, H = 64, 96


def _graph(path, table, head=None):
    """ids -> Gather(table) -> MatMul(head) -> logits, weights in external data as the exporter writes them;
    without ``head``, the head is a Transpose node of the table (a tied head as ``attach_weights`` writes it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"], name="/model/embed_tokens/Gather"),
             helper.make_node("MatMul", ["x", "head"], ["logits"], name="/lm_head/MatMul")]
    inits = [numpy_helper.from_array(table, "table")]
    if head is None:
        nodes.insert(0, helper.make_node("Transpose", ["table"], ["head"], name="/tied_head/Transpose_0",
                                         perm=[1, 0]))
    else:
        inits.append(numpy_helper.from_array(head, "head"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)


def _run(path, ids):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


@pytest.mark.parametrize("tied", [True, False])
def test_tied_head_shares_one_table(tmp_path, tied):
    import onnx
    from edgeprune.export.onnx_quant import quantize_nbits

    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, H)).astype(np.float32)
    head = np.ascontiguousarray(table.T) if tied else rng.standard_normal((H, V)).astype(np.float32)
    _graph(tmp_path / "f.onnx", table, head)
    info = quantize_nbits(tmp_path / "f.onnx", tmp_path / "q.onnx", bits=8)
    assert info["shared_tied_head"] is tied and info["quantized_embeddings"] == 1 and info["nbits"]["matmuls"] == 1
    q = onnx.load(str(tmp_path / "q.onnx"))
    tables = [t for t in q.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert len(tables) == (1 if tied else 2)
    ids = np.array([[0, 5, 17, 63], [1, 2, 3, 4]], dtype=np.int64)
    want = table[ids] @ head
    got = _run(tmp_path / "q.onnx", ids)
    assert got.shape == want.shape
    # 8-bit blocks of 32 on both operands: errors of a few hundredths on logits of size ~10
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_head_equal_in_shape_only_is_not_shared(tmp_path):
    """Sharing is decided by the weights, not the shapes: a head that differs from the table in one element keeps
    its own table."""
    from edgeprune.export.onnx_quant import quantize_nbits

    table = np.random.default_rng(1).standard_normal((V, H)).astype(np.float32)
    head = np.ascontiguousarray(table.T)
    head[3, 7] += 1.0
    _graph(tmp_path / "f.onnx", table, head)
    assert quantize_nbits(tmp_path / "f.onnx", tmp_path / "q.onnx", bits=8)["shared_tied_head"] is False


@pytest.mark.parametrize("block, shared", [(32, True), (64, False)])
def test_tied_head_written_as_a_transpose(tmp_path, block, shared):
    """The exporter's tied head (a Transpose node of the embedding) shares the int8 table when the hidden size is
    whole blocks; otherwise the head is quantized from the transposed table on its own (the embedding, not whole
    blocks, stays float). Either way no Transpose is left and the logits are the float graph's."""
    import onnx
    from edgeprune.export.onnx_quant import quantize_nbits

    table = np.random.default_rng(2).standard_normal((V, H)).astype(np.float32)
    _graph(tmp_path / "f.onnx", table)
    ids = np.array([[0, 5, 17, 63]], dtype=np.int64)
    assert np.allclose(_run(tmp_path / "f.onnx", ids), table[ids] @ table.T, atol=1e-4)
    info = quantize_nbits(tmp_path / "f.onnx", tmp_path / "q.onnx", bits=8, block_size=block)
    assert info["shared_tied_head"] is shared and info["nbits"]["matmuls"] == 1
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert not [n for n in q.graph.node if n.op_type == "Transpose"]
    assert {n.op_type for n in q.graph.node} >= {"MatMulNBits"}
    want = table[ids] @ table.T
    got = _run(tmp_path / "q.onnx", ids)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
