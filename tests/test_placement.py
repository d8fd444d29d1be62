"""Working dtype and device: bf16 models through score -> prune -> save -> reload -> export; CUDA paths skip here."""

import json

import pytest
import torch

from edgeprune.checkpoint import save_checkpoint
from edgeprune.data import calibration_batches, load_text
from edgeprune.errors import EdgePruneError
from edgeprune.models import load
from edgeprune.models.placement import resolve
from edgeprune.models.tiny import build_tiny
from edgeprune.plan import LayerPlan, PruningPlan
from edgeprune.prune import PruneConfig, prune_model
from edgeprune.scoring import make_scorer, score_model
from edgeprune.surgery import apply_plan

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")


@pytest.mark.parametrize("kw, msg", [
    (dict(dtype="float64"), "unknown dtype 'float64'"),
    (dict(dtype="bf16"), "unknown dtype"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(device="cuda:x"), "unknown device"),
])
def test_bad_placements_are_one_line_errors_before_loading(kw, msg):
    with pytest.raises(EdgePruneError, match=msg) as e:
        load("/nonexistent/model", **kw)  # the placement is checked before the model is looked for
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_one_line_error(device):
    with pytest.raises(EdgePruneError, match="needs CUDA"):
        resolve(device)
    assert resolve("auto").device == "cpu"  # auto falls back to the CPU


def _all_dtype(model, dtype) -> bool:
    return all(p.dtype == dtype for p in model.parameters())


def test_bf16_score_prune_save_reload(tmp_path):
    text = load_text("builtin", "calib")
    lm = build_tiny("llama", dtype="bfloat16")
    ref = build_tiny("llama")
    assert _all_dtype(lm.model, torch.bfloat16)
    cfg = PruneConfig(0.3, scorer="piem", allocator="lsps", sensitivity="loss", n_samples=8, seq_len=32,
                      rounds=2, reconstruct=True, sensitivity_samples=4)
    record = prune_model(lm, cfg, text, progress=False)
    assert _all_dtype(lm.model, torch.bfloat16) and record["total_reduction"] > 0
    # the float32 twin gets the same shapes: bf16 rounding does not change this plan
    prune_model(ref, PruneConfig(**{**vars(cfg), "scorer_options": {}}), text, progress=False)
    assert lm.adapter.shapes() == ref.adapter.shapes()
    ck = save_checkpoint(lm, tmp_path / "ck", {})
    assert json.loads((ck / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(ck / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    ids = calibration_batches(lm.tokenizer, load_text("builtin", "eval"), 2, 24, seed=3)
    with torch.no_grad():
        want = lm.model(ids).logits
        again = load(str(ck), dtype="bfloat16")
        assert _all_dtype(again.model, torch.bfloat16)
        assert torch.equal(again.model(ids).logits, want)
        up = load(str(ck))  # the default working dtype is float32: the bf16 weights are upcast exactly
        assert _all_dtype(up.model, torch.float32)
        assert torch.allclose(up.model(ids).logits, want.float(), atol=0.15)


def test_bf16_whole_blocks_removed_keep_the_dtype(tmp_path):
    lm = build_tiny("llama", dtype="bfloat16")
    bias = torch.full((96,), 0.5, dtype=torch.bfloat16)
    apply_plan(lm.adapter, PruningPlan([LayerPlan(0, [], [], list(range(64))), LayerPlan(1, [0, 1, 2], [0], []),
                                        LayerPlan(2, list(range(6)), [0, 1], list(range(128)))]),
               attention_bias={0: bias}, mlp_bias={1: bias})
    assert _all_dtype(lm.model, torch.bfloat16)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        want = lm.model(ids).logits
    ck = save_checkpoint(lm, tmp_path / "ck", {})
    with torch.no_grad():
        assert torch.equal(load(str(ck), dtype="bfloat16").model(ids).logits, want)


def test_bf16_scores_match_float32():
    """Statistics and score sums accumulate in float64: bf16 weights change scores by rounding only."""
    text = load_text("builtin", "calib")
    lo, hi = build_tiny("llama", dtype="bfloat16"), build_tiny("llama")
    batches = calibration_batches(hi.tokenizer, text, 6, 32, seed=0)
    a = score_model(lo.adapter, make_scorer("piem"), batches, micro_batch=3, progress=False, block_stats=True)
    b = score_model(hi.adapter, make_scorer("piem"), batches, micro_batch=3, progress=False, block_stats=True)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.channels.dtype == torch.float64
        assert torch.corrcoef(torch.stack([x.channels, y.channels]))[0, 1] > 0.99
        assert torch.corrcoef(torch.stack([x.heads, y.heads]))[0, 1] > 0.99
        assert x.blocks["layer"] == pytest.approx(y.blocks["layer"], rel=0.05)


def test_bf16_checkpoint_exports_to_gguf(tmp_path):
    pytest.importorskip("llama_cpp")
    from edgeprune.export.gguf import check_gguf, export_gguf

    lm = build_tiny("llama", dtype="bfloat16")
    apply_plan(lm.adapter, PruningPlan([LayerPlan(i, [0, 1, 2], [0], list(range(0, 128, 2))) for i in range(3)]))
    ck = save_checkpoint(lm, tmp_path / "ck", {})
    export_gguf(ck, tmp_path / "m.gguf", "f32")  # bf16 safetensors are read through torch and upcast
    report = check_gguf(tmp_path / "m.gguf", ck, ["The quick brown fox"], n_tokens=4)
    assert report["passed"], report


@CUDA
def test_cuda_bf16_prune_matches_the_cpu_plan(tmp_path):
    text = load_text("builtin", "calib")
    cfg = dict(ratio=0.3, scorer="piem", allocator="lsps", sensitivity="bi", n_samples=8, seq_len=32,
               reconstruct=True)
    gpu, cpu = build_tiny("llama", device="cuda", dtype="bfloat16"), build_tiny("llama")
    prune_model(gpu, PruneConfig(**cfg), text, progress=False)
    prune_model(cpu, PruneConfig(**cfg), text, progress=False)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in gpu.model.parameters())
    assert gpu.adapter.shapes() == cpu.adapter.shapes()
    ck = save_checkpoint(gpu, tmp_path / "ck", {})
    assert load(str(ck), device="cuda", dtype="bfloat16").model.device.type == "cuda"


def test_offloaded_device_maps_are_refused():
    from types import SimpleNamespace

    from edgeprune.models.placement import check_resident

    check_resident(SimpleNamespace(hf_device_map={"model.layers.0": 0, "model.layers.1": 1}))  # GPUs only: fine
    check_resident(SimpleNamespace())  # no device map
    with pytest.raises(EdgePruneError, match="offloaded layers to cpu, disk"):
        check_resident(SimpleNamespace(hf_device_map={"model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}))


@CUDA
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for a device map")
def test_auto_device_map_spreads_layers_and_prunes(tmp_path):
    lm = build_tiny("llama")
    ck = save_checkpoint(lm, tmp_path / "ck", {})
    auto = load(str(ck), device="auto", dtype="bfloat16")
    assert len({p.device for p in auto.model.parameters()}) >= 1
    prune_model(auto, PruneConfig(0.3, n_samples=4, seq_len=16, reconstruct=True), load_text("builtin", "calib"),
                progress=False)
