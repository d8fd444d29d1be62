import os
from pathlib import Path

import pytest

DATA = Path(os.environ.get("EDGEPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "wikitext-2" / "wiki.test.raw").is_file():
        pytest.skip(f"evaluation data not found at {DATA}")
    return DATA


@pytest.fixture(params=FAMILIES)
def tiny(request):
    from edgeprune.models.tiny import build_tiny

    return build_tiny(request.param)


@pytest.fixture(scope="session")
def default_lm():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session. Tests must not modify it."""
    from edgeprune.models import load

    return load("default")


@pytest.fixture
def fresh_default():
    from edgeprune.models import load

    return load("default")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict:
    """One tiny fp32 GGUF and ONNX artifact per test session (the device and ship tests share them)."""
    root = tmp_path_factory.getbasetemp() / "tiny-device-artifacts"
    out = {"gguf": root / "tiny-gguf-f32", "onnx": root / "tiny-onnx-fp32"}
    if all((p / "manifest.json").is_file() for p in out.values()):
        return out
    pytest.importorskip("llama_cpp")
    from edgeprune.export.artifacts import export_artifact

    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models.tiny import build_tiny

    ck = root / "checkpoint"
    if not (ck / "manifest.json").is_file():
        save_checkpoint(build_tiny("llama"), ck, {})
    for fmt, path in out.items():
        if not (path / "manifest.json").is_file():
            export_artifact(str(ck), fmt, "fp32", path)
    return out
