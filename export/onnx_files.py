"""ONNX files on disk: the file names of an export, saving a graph (its weights beside it in ``model.onnx.data``
when they pass protobuf's 2 GiB limit), the size of a graph with its external data, and a context that silences
onnxruntime's Python tooling.

It does not trace, convert, quantize or check a graph (``onnx_trace.py``, ``onnx_quant.py``, ``onnx_check.py``)
and does not decide where an export is published (``onnx.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# protobuf refuses messages of 2 GiB; keep a margin for the graph itself
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2


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


def file_bytes(path: Path) -> int:
    """Size of the graph at ``path`` plus its ``.data`` file, if any."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


class quiet:
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
