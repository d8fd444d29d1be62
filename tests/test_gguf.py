"""GGUF export: llama.cpp (llama-cpp-python) must reproduce PyTorch's logits and greedy tokens."""

import json
from pathlib import Path

import pytest
import torch
from edgeprune.export.gguf import TOLERANCE, check_gguf, export_gguf, gguf_dtype, gguf_perplexity
from edgeprune.export.gguf.reader import metadata
from edgeprune.export.gguf.source import resolve_checkpoint

from edgeprune.checkpoint import save_checkpoint
from edgeprune.errors import EdgePruneError
from edgeprune.models.tiny import build_tiny
from edgeprune.plan import LayerPlan, PruningPlan
from edgeprune.surgery import apply_plan

pytest.importorskip("llama_cpp")

HIDDEN = 96  # tiny models: 6 heads, 2 KV heads, head_dim 16, MLP 128
PROMPTS = ["hello world", "The quick brown fox jumps"]
WIKI = Path("/work/shared/data/wikitext-2/wiki.test.raw")


def vec(seed: int, scale: float = 0.3) -> torch.Tensor:
    return scale * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def nonuniform(tmp_path, family: str) -> Path:
    """Five layers: attention removed in layer 0 (constant bias), a KV group removed + narrower MLP + o_proj and
    down_proj biases in layer 1, layer 2 removed entirely (both constants), query heads removed inside groups in
    layer 3, the last layer's MLP removed (constant bias)."""
    lm = build_tiny(family, num_hidden_layers=5)
    plan = PruningPlan([
        LayerPlan(0, [], [], list(range(0, 128, 2))),
        LayerPlan(1, [3, 4, 5], [1], list(range(100))),
        LayerPlan(2, [], [], []),
        LayerPlan(3, [0, 2, 3, 5], [0, 1], list(range(40))),
        LayerPlan(4, [0, 1, 2, 3, 4, 5], [0, 1], []),
    ])
    apply_plan(lm.adapter, plan, attention_bias={0: vec(0), 1: vec(1), 2: vec(2)},
               mlp_bias={1: vec(3), 2: vec(4), 4: vec(5)})
    return save_checkpoint(lm, tmp_path / f"{family}-nonuniform", {})


def assert_parity(report: dict, tol: float) -> None:
    assert report["max_abs_logit_diff"] < tol, report
    assert report["top1_agreement"] == 1.0
    assert report["greedy_match"] and report["greedy_tokens"] == report["reference_tokens"]
    assert report["tokenizer_match"]
    assert report["passed"]


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "deci")])
def test_uniform_tiny_with_output_biases(tmp_path, family, arch):
    """llama.cpp's llama adds o_proj biases; its qwen2 does not, so such a Qwen2 goes to deci (per-layer Llama)."""
    lm = build_tiny(family)
    plan = PruningPlan([LayerPlan(i, [0, 1, 2], [0], list(range(0, 128, 2))) for i in range(3)])
    # bias compensation on every o_proj: the shapes stay uniform, and both graphs add the output bias
    apply_plan(lm.adapter, plan, attention_bias={i: vec(i) for i in range(3)})
    ckpt = save_checkpoint(lm, tmp_path / "ck", {})
    info = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert info["arch"] == arch and info["n_layers"] == 3 and info["dtype"] == "f32"
    assert info["tokenizer"]["model"] == "gpt2" and info["tokenizer"]["n_tokens"] == 259
    assert info["size_bytes"] == (tmp_path / "m.gguf").stat().st_size and len(info["sha256"]) == 64
    meta = metadata(tmp_path / "m.gguf", ("general.architecture", f"{arch}.attention.head_count",
                                          f"{arch}.attention.key_length", f"{arch}.feed_forward_length"))
    per_layer = arch == "deci"  # arrays, one entry per layer
    assert meta == {"general.architecture": arch, f"{arch}.attention.head_count": [3] * 3 if per_layer else 3,
                    f"{arch}.attention.key_length": 16, f"{arch}.feed_forward_length": [64] * 3 if per_layer else 64}
    assert_parity(check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=8), 1e-3)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
])
def test_rope_scaling(tmp_path, rope):
    ckpt = save_checkpoint(build_tiny("llama", rope_parameters=rope), tmp_path / "ck", {})
    info = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert info["rope"]["type"] == rope["rope_type"]
    # positions past original_max_position_embeddings / 4 exercise every llama3 frequency band
    report = check_gguf(tmp_path / "m.gguf", ckpt, ["a longer prompt that reaches far positions, " * 3], n_tokens=4)
    assert_parity(report, 1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_nonuniform_tiny_exports_as_deci(tmp_path, family):
    ckpt = nonuniform(tmp_path, family)
    info = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert info["arch"] == "deci"
    # a zero layer in front (layer 0 has no heads), layer 2 left out, a placeholder FFN in the last layer
    assert info["zero_layer_in_front"] and info["dropped_layers"] == [2] and info["placeholder_ffn_layers"] == [4]
    assert [(d["heads"], d["kv_heads"], d["gguf_ffn"]) for d in info["layers"]] == [
        (1, 1, 32), (0, 0, 64), (3, 1, 100), (4, 2, 40), (6, 2, 32)]
    assert info["folded_biases"] == [{"from": "layer 0 attention", "into": "blk.0.ffn_down.bias"},
                                     {"from": "layer 2 attention", "into": "blk.2.ffn_down.bias"},
                                     {"from": "layer 2 mlp", "into": "blk.2.ffn_down.bias"}]
    meta = metadata(tmp_path / "m.gguf", ("deci.attention.head_count", "deci.attention.head_count_kv",
                                                "deci.feed_forward_length", "deci.attention.key_length"))
    assert meta["deci.attention.head_count"] == [1, 0, 3, 4, 6]
    assert meta["deci.attention.head_count_kv"] == [1, 0, 1, 2, 2]
    assert meta["deci.feed_forward_length"] == [32, 64, 100, 40, 32] and meta["deci.attention.key_length"] == 16
    assert_parity(check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=8), 1e-3)


def test_nonuniform_without_removed_first_attention_has_no_zero_layer(tmp_path):
    lm = build_tiny("llama")
    apply_plan(lm.adapter, PruningPlan([
        LayerPlan(0, [0, 1, 2, 3, 4, 5], [0, 1], list(range(128))),
        LayerPlan(1, [], [], list(range(50))),
        LayerPlan(2, [1, 2], [0], [])]), attention_bias={1: vec(7)}, mlp_bias={2: vec(8)})
    ckpt = save_checkpoint(lm, tmp_path / "ck", {})
    info = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert info["arch"] == "deci" and not info["zero_layer_in_front"] and info["n_layers"] == 3
    assert info["folded_biases"] == [{"from": "layer 1 attention", "into": "blk.0.ffn_down.bias"}]
    assert_parity(check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=8), 1e-3)


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_k_m"])
def test_tiny_lower_precision(tmp_path, dtype):
    ckpt = nonuniform(tmp_path, "llama")
    info = export_gguf(ckpt, tmp_path / f"m-{dtype}.gguf", dtype)
    assert gguf_dtype(tmp_path / f"m-{dtype}.gguf") == dtype and info["dtype"] == dtype
    if dtype == "q8_0":
        assert info["tensor_types"]["Q8_0"] > 0 and info["tensor_types"]["F32"] > 0  # norms/biases stay f32
    report = check_gguf(tmp_path / f"m-{dtype}.gguf", ckpt, PROMPTS, n_tokens=8)
    assert report["max_abs_logit_diff"] < TOLERANCE[dtype], report
    assert report["passed"], report


def test_perplexity_matches_pytorch_on_tiny(tmp_path):
    from edgeprune.data import Text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load

    ckpt = nonuniform(tmp_path, "llama")
    export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    lm = load(str(ckpt))
    text = Text("The quick brown fox jumps over the lazy dog. " * 8, "fox")
    ref = perplexity(lm.model, lm.tokenizer, text, seq_len=64, progress=False)
    got = gguf_perplexity(tmp_path / "m.gguf", text, seq_len=64)
    assert got["windows"] == ref["windows"] == 5 and got["tokens_scored"] == ref["tokens_scored"]
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)


# --------------------------------------------------------------------------------------------- bad input


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_bad_inputs_raise_and_leave_nothing(tmp_path):
    ckpt = save_checkpoint(build_tiny("llama"), tmp_path / "ck", {})
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty").mkdir()
    cases = [
        (lambda: export_gguf(tmp_path / "empty", out / "a.gguf"), "not a model directory"),
        (lambda: export_gguf(tmp_path / "nope", out / "a.gguf"), "not a model directory"),
        (lambda: export_gguf(ckpt, out / "a.gguf", dtype="q3_xs"), "unknown GGUF dtype"),
        (lambda: export_gguf(ckpt, ckpt / "config.json" / "a.gguf"), "cannot create output directory"),
        (lambda: export_gguf(ckpt, out), "is a directory"),
        (lambda: check_gguf(out / "missing.gguf", ckpt), "not found"),
    ]
    for fn, needle in cases:
        with pytest.raises(EdgePruneError, match=needle) as e:
            fn()
        assert "\n" not in str(e.value)
    assert leftovers(out) == []
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(EdgePruneError, match="cannot export model_type 'gpt2'"):
        export_gguf(ckpt, out / "a.gguf")
    assert leftovers(out) == []


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import edgeprune.export.gguf.writer as g

    ckpt = save_checkpoint(build_tiny("llama"), tmp_path / "ck", {})
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.gguf").write_bytes(b"old")
    calls = []

    def boom(tensor, dtype):
        calls.append(tensor.name)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(tensor, dtype)

    real = g._encode
    monkeypatch.setattr(g, "_encode", boom)
    with pytest.raises(EdgePruneError, match="No space left"):
        export_gguf(ckpt, out / "m.gguf", "f32")
    assert leftovers(out) == ["m.gguf"] and (out / "m.gguf").read_bytes() == b"old"


# ---------------------------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_real_dense_f16(tmp_path, default_lm):
    from edgeprune.models import resolve_default_gguf

    # load("default").source is the model cache, or the .gguf itself the first time: both name the cache
    assert resolve_checkpoint(resolve_default_gguf()) == resolve_checkpoint(Path(default_lm.source))
    info = export_gguf(default_lm.source, tmp_path / "m.gguf", "f16")
    assert info["arch"] == "llama" and info["n_layers"] == 30 and info["tensor_types"] == {"F16": 211, "F32": 61}
    # SmolLM2's pre-tokenizer, found through the cache manifest's link to the GGUF it was made from
    assert info["tokenizer"]["pre"] == "smollm" and not info["tokenizer"]["add_bos"]
    report = check_gguf(tmp_path / "m.gguf", default_lm.source, PROMPTS, n_tokens=12, lm=default_lm)
    assert report["max_abs_logit_diff"] < TOLERANCE["f16"] and report["top1_agreement"] == 1.0, report
    assert report["greedy_match"] and report["passed"]


def real_nonuniform(lm):
    """Per-layer shapes on SmolLM2: attention removed in layer 13 and the MLP in layer 22 (mean outputs kept as
    biases), a KV group removed in layers 6 and 27, narrower MLPs (by down_proj column norm) in layers 3 and 9."""
    layers = lm.model.model.layers
    calib = lm.tokenizer("Paris is the capital and most populous city of France. " * 6,
                         return_tensors="pt").input_ids
    means = {}
    hooks = [layers[13].self_attn.register_forward_hook(lambda m, a, o: means.__setitem__("a", o[0].mean((0, 1)))),
             layers[22].mlp.register_forward_hook(lambda m, a, o: means.__setitem__("m", o.mean((0, 1))))]
    with torch.no_grad():
        lm.model(input_ids=calib, use_cache=False)
    for h in hooks:
        h.remove()
    plan = PruningPlan.identity(lm.adapter)
    for i, width in ((3, 1344), (9, 1408)):
        norms = layers[i].mlp.down_proj.weight.norm(dim=0)
        plan.layers[i].channels = sorted(torch.topk(norms, width).indices.tolist())
    for i in (6, 27):
        plan.layers[i].kv_heads, plan.layers[i].heads = [0, 1], list(range(6))
    plan.layers[13].heads, plan.layers[13].kv_heads = [], []
    plan.layers[22].channels = []
    apply_plan(lm.adapter, plan, attention_bias={13: means["a"]}, mlp_bias={22: means["m"]})


@pytest.mark.slow
def test_real_nonuniform_deci_f32(tmp_path, fresh_default):
    real_nonuniform(fresh_default)
    ckpt = save_checkpoint(fresh_default, tmp_path / "ck", {"source": fresh_default.source})
    info = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert info["arch"] == "deci" and info["n_layers"] == 30 and not info["zero_layer_in_front"]
    assert info["tokenizer"]["pre"] == "smollm"  # manifest -> model cache -> the GGUF it was dequantized from
    assert info["placeholder_ffn_layers"] == [22] and info["folded_biases"][0]["into"] == "blk.12.ffn_down.bias"
    report = check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=12, lm=fresh_default)
    assert_parity(report, TOLERANCE["f32"])
    assert report["greedy_text"] == report["reference_text"] and len(report["greedy_text"]) > 10


@pytest.mark.slow
def test_real_q8_0_perplexity_close_to_f32(tmp_path, default_lm):
    """q8_0 in llama.cpp vs. the fp32 reference (PyTorch; the f32 GGUF reproduces it: 52.6598 vs 52.6594 on
    1024 tokens, and to 1e-4 relative in test_perplexity_matches_pytorch_on_tiny)."""
    if not WIKI.is_file():
        pytest.skip(f"{WIKI} not found")
    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity

    text = load_text(str(WIKI))
    export_gguf(default_lm.source, tmp_path / "q8.gguf", "q8_0")
    ref = perplexity(default_lm.model, default_lm.tokenizer, text, seq_len=128, max_tokens=256, progress=False)
    q8 = gguf_perplexity(tmp_path / "q8.gguf", text, seq_len=128, max_tokens=256)  # llama.cpp's own tokenizer
    assert q8["windows"] == ref["windows"] == 2
    assert q8["ppl"] == pytest.approx(ref["ppl"], rel=0.03)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bf16_checkpoint_reference_is_float32_math_on_bf16_weights(tmp_path, family, monkeypatch):
    """A bf16 checkpoint's reference is loaded in bf16 (no float32 copy of the model) and computed in float32
    module by module: the same logits and greedy tokens as the checkpoint loaded in float32, so the f32 GGUF
    passes with the fp32 tests' bound."""
    from edgeprune.export.gguf.check import _torch_greedy, float32_compute, stored_dtype

    import edgeprune.models

    lm = build_tiny(family, dtype="bfloat16")
    ckpt = save_checkpoint(lm, tmp_path / "ck", {})
    assert stored_dtype(ckpt) == "bfloat16"
    ref = edgeprune.models.load(str(ckpt), dtype="float32").model
    model = edgeprune.models.load(str(ckpt), dtype="bfloat16").model
    ids = torch.tensor([list(range(3, 40))])
    with torch.inference_mode():
        want = ref(input_ids=ids).logits
        plain = model(input_ids=ids).logits.float()
        with float32_compute(model):
            got = model(input_ids=ids).logits
            greedy = _torch_greedy(model, ids[0].tolist(), 6)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    assert (plain - want).abs().max() > 100 * (got - want).abs().max()  # bf16 math is much further off
    assert greedy[0] == _torch_greedy(ref, ids[0].tolist(), 6)[0]
    # the weights are bf16 again, plain tensors (usable with autograd), and the hooks are gone
    assert all(p.dtype == torch.bfloat16 and not p.is_inference() for p in model.parameters())
    assert torch.equal(model(input_ids=ids).logits.float(), plain)
    if family != "llama":
        return
    seen = []
    real = edgeprune.models.load
    monkeypatch.setattr(edgeprune.models, "load", lambda spec, **kw: seen.append(kw.get("dtype")) or real(spec, **kw))
    export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    report = check_gguf(tmp_path / "m.gguf", ckpt, PROMPTS, n_tokens=8)
    assert seen == ["bfloat16"]
    assert_parity(report, 1e-3)
