import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from edgeprune.devices import local_sshd

DATA = Path(os.environ.get("EDGEPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "wikitext-2" / "wiki.test.raw").is_file():
        pytest.skip(f"evaluation data not found at {DATA}")
    return DATA


def save_tiny_llama(root: Path) -> Path:
    """A tiny random-initialised Llama (weights and tokenizer) saved to ``root/tiny``: the pipeline tests' model."""
    from edgeprune.models.tiny import build_tiny

    lm = build_tiny("llama")
    lm.model.save_pretrained(root / "tiny")
    lm.tokenizer.save_pretrained(root / "tiny")
    return root / "tiny"


def tiny_run_config(root: Path, template: str) -> Path:
    """``root/tiny.toml`` from a run-config ``template`` with ``{model}`` (a saved tiny Llama) and ``{out}``."""
    path = root / "tiny.toml"
    path.write_text(template.format(model=save_tiny_llama(root), out=root / "run"))
    return path


def smollm2_plan(lm, attention: dict[int, tuple[list[int], list[int]]]):
    """A non-uniform plan for SmolLM2-135M (30 layers, 9 heads in 3 KV groups, 1536 channels): the kept (heads, KV
    heads) of ``attention``'s layers (every head elsewhere) and four MLP widths (1536, 1408, 1280, 1408 by layer
    index mod 4), the channels kept by |activation| x |down_proj column| on a little calibration text."""
    import torch

    from edgeprune.data import calibration_batches, load_text
    from edgeprune.plan import LayerPlan, PruningPlan

    act = {}
    hooks = [layer.mlp_projections().down.register_forward_pre_hook(
        lambda mod, inp, i=layer.index: act.__setitem__(i, act.get(i, 0) + inp[0].abs().sum((0, 1))))
        for layer in lm.adapter.layers]
    with torch.no_grad():
        lm.model(input_ids=calibration_batches(lm.tokenizer, load_text("builtin", "calib"), 4, 128), use_cache=False)
    for h in hooks:
        h.remove()
    layers = []
    for layer in lm.adapter.layers:
        i = layer.index
        heads, kv = attention.get(i, (list(range(9)), [0, 1, 2]))
        score = act[i] * layer.mlp_projections().down.weight.norm(dim=0)
        k = (1536, 1408, 1280, 1408)[i % 4]
        layers.append(LayerPlan(i, heads, kv, sorted(score.topk(k).indices.tolist())))
    return PruningPlan(layers)


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


# ---- a real OpenSSH server on 127.0.0.1 standing in for a device (test_ship.py, test_aarch64.py) ----------------
SSHD, free_port = local_sshd.SSHD, local_sshd.free_port


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    try:
        server = local_sshd.start(tmp_path_factory.mktemp("sshd"))
    except local_sshd.SshdUnavailable as e:
        pytest.skip(str(e))
    device = server.dir / "device"
    device.mkdir()
    with server:
        yield SimpleNamespace(port=server.port, user=server.user, host=server.host, key=server.key,
                              stranger_key=server.stranger_key, known_hosts=server.known_hosts, dir=server.dir,
                              device=device)
