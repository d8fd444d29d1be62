import json
import subprocess
import sys

import pytest

from edgeprune.checkpoint import save_checkpoint
from edgeprune.models.tiny import build_tiny
from edgeprune.plan import LayerPlan, PruningPlan
from edgeprune.surgery import apply_plan


def run(*args):
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    lm = build_tiny("llama")
    apply_plan(lm.adapter, PruningPlan([LayerPlan(0, [3, 4, 5], [1], list(range(64))),
                                        LayerPlan(1, list(range(6)), [0, 1], list(range(100))),
                                        LayerPlan(2, [], [], list(range(0, 128, 4)))]))
    d = tmp_path_factory.mktemp("ck") / "pruned"
    save_checkpoint(lm, d, {})
    return d


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_export_per_layer_model(pruned_dir, tmp_path, fmt):
    out = tmp_path / f"art-{fmt}"
    p = run("export", str(pruned_dir), "--format", fmt, "--dtype", "fp32", "-o", str(out),
            "--json", str(tmp_path / "e.json"))
    assert p.returncode == 0, p.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and (out / "tokenizer.json").is_file()
    assert (out / ("model.gguf" if fmt == "gguf" else "model.onnx")).is_file()


@pytest.mark.parametrize("args,needle", [
    (["--format", "tflite"], "unknown format"),
    (["--format", "onnx", "--dtype", "q8_0"], "GGUF type"),
    (["--format", "gguf", "--dtype", "int4"], "unknown dtype"),
])
def test_export_bad_options(pruned_dir, tmp_path, args, needle):
    p = run("export", str(pruned_dir), *args, "-o", str(tmp_path / "o"))
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_export_bad_paths(pruned_dir, tmp_path):
    p = run("export", str(tmp_path), "--format", "gguf", "-o", str(tmp_path / "o"))
    assert p.returncode == 2 and "not a model directory" in p.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = run("export", str(pruned_dir), "--format", "gguf", "-o", str(blocker / "sub"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == [blocker]
