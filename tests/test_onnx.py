"""ONNX export (export/onnx.py) and the device-side onnxruntime generator (devices/ort_generate.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import smollm2_plan

from edgeprune.errors import EdgePruneError

FAMILIES = ("llama", "mistral", "qwen2")
WIKI = "wikitext-2/wiki.test.raw"


def tiny_plan():
    """Layer 0 without attention, different KV heads (1 or 2) per layer, different MLP widths, no MLP in layer 2."""
    from edgeprune.plan import LayerPlan, PruningPlan

    return PruningPlan([
        LayerPlan(0, heads=[], kv_heads=[], channels=list(range(0, 128, 2))),
        LayerPlan(1, heads=[0, 2, 3, 5], kv_heads=[0, 1], channels=list(range(100))),
        LayerPlan(2, heads=[3, 4, 5], kv_heads=[1], channels=[]),
    ])


def real_plan(lm):
    """A non-uniform plan for SmolLM2-135M: layer 27 without attention, 1 or 2 KV groups in six layers, four MLP
    widths (conftest.smollm2_plan), so the model stays usable: PPL ~2x the dense model's."""
    attention = {27: ([], [])}
    attention.update({i: ([0, 1, 2, 6, 7, 8], [0, 2]) for i in (20, 22, 24, 26)})
    attention.update({i: ([3, 4, 5], [1]) for i in (25, 28)})
    return smollm2_plan(lm, attention)


def _checkpoint(root: Path, name: str) -> tuple[Path, list]:
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models.tiny import build_tiny
    from edgeprune.surgery import apply_plan

    lm = build_tiny("llama" if name == "pruned" else name)
    if name == "pruned":
        apply_plan(lm.adapter, tiny_plan())
    save_checkpoint(lm, root / f"{name}-ck", {})
    return root / f"{name}-ck", lm.adapter.shapes()


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """Every tiny case exported once (fp32): {name: (checkpoint dir, onnx dir, info, layer shapes)}."""
    from edgeprune.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in (*FAMILIES, "pruned"):
        ck, shapes = _checkpoint(root, name)
        info = export_onnx(ck, root / f"{name}-onnx")
        out[name] = (ck, root / f"{name}-onnx", info, shapes)
    return out


@pytest.mark.parametrize("name", [*FAMILIES, "pruned"])
def test_tiny_export_parity(tiny_exports, name):
    _, d, info, _ = tiny_exports[name]
    p = info["parity"]
    assert p["passed"] and p["greedy_match"] and p["cache_match"], p
    assert p["max_abs_logit_diff"] < 1e-4 and p["cache_max_abs_logit_diff"] < 1e-4
    assert info["weights"].startswith("graph traced without parameters")  # no full trace, no model copies
    assert {f.name for f in d.iterdir()} >= {"model.onnx", "tokenizer.json", "config.json", "manifest.json"}
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["kind"] == "onnx-export" and manifest["parity"]["passed"]
    assert not [f for f in d.parent.iterdir() if f.name.startswith(".")]  # no temp dirs left
    # the tied lm_head is a Transpose of the embedding, not a second [vocab, hidden] table in the file
    import onnx

    graph = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    tables = [t.name for t in graph.initializer if vocab in t.dims]
    assert manifest["shared_tied_head"] is True and len(tables) == 1, tables
    assert any(n.op_type == "Transpose" and n.input[0] == tables[0] for n in graph.node)


@pytest.mark.parametrize("name", ["llama", "pruned"])
def test_graph_interface(tiny_exports, name):
    import onnx

    _, d, info, shapes = tiny_exports[name]
    graph = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
    opset = {o.domain: o.version for o in onnx.load(str(d / "model.onnx"), load_external_data=False).opset_import}
    assert opset[""] >= 17

    def dims(v):
        return [x.dim_param or x.dim_value for x in v.type.tensor_type.shape.dim]

    ins = {v.name: dims(v) for v in graph.input}
    outs = {v.name: dims(v) for v in graph.output}
    assert ins["input_ids"] == ins["position_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert outs["logits"][:2] == ["batch_size", "sequence_length"]
    for i, s in enumerate(shapes):
        for kind in ("key", "value"):
            if s.num_kv_heads == 0:  # a layer without attention has no cache tensors at all
                assert f"past_key_values.{i}.{kind}" not in ins and f"present.{i}.{kind}" not in outs
            else:
                assert ins[f"past_key_values.{i}.{kind}"] == ["batch_size", s.num_kv_heads, "past_sequence_length", 16]
                assert outs[f"present.{i}.{kind}"] == ["batch_size", s.num_kv_heads, "total_sequence_length", 16]
    assert info["kv_heads"] == [s.num_kv_heads for s in shapes if s.num_kv_heads]


def test_generator_reads_heads_from_graph(tiny_exports):
    from edgeprune.devices.ort_generate import OrtGenerator

    _, d, _, shapes = tiny_exports["pruned"]
    g = OrtGenerator(d, threads=1)
    assert g.kv_layers == [1, 2] and g.kv_heads == {1: shapes[1].num_kv_heads, 2: shapes[2].num_kv_heads}
    # dynamic batch, a non-empty past, a left-padded row
    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10], [11, 12, 13, 14]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=np.int64)
    logits, past = g.forward(ids, attention_mask=mask)
    assert logits.shape == (3, 4, 259) and past["past_key_values.2.key"].shape == (3, 1, 4, 16)
    step, past = g.forward(np.array([[1], [2], [3]]), past=past,
                           attention_mask=np.concatenate([mask, np.ones((3, 1), np.int64)], 1))
    full = g.prefill(np.array([[5, 6, 7, 8, 1]]))
    assert np.allclose(step[0, -1], full[0, -1], atol=1e-5)
    alone = g.prefill(np.array([[9, 10, 2]]))
    assert np.allclose(step[1, -1], alone[0, -1], atol=1e-5)  # padding changes nothing


def test_generator_text_timing_and_perplexity(tiny_exports):
    from edgeprune.devices.ort_generate import OrtGenerator

    from edgeprune.data import Text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load

    ck, d, _, _ = tiny_exports["llama"]
    g = OrtGenerator(d, threads=1)
    seen = []
    new = g.generate("Hello there", max_new_tokens=5, stop_at_eos=False, on_token=lambda t, s: seen.append(t))
    assert len(new) == 5 and seen == new and isinstance(g.decode(new), str)
    t = g.last_timing
    assert t.prompt_tokens == len(g.encode("Hello there")) and t.ttft_s > 0 and len(t.token_s) == 4
    assert t.to_dict()["decode_ms_per_token"] > 0
    sampled = g.generate([5, 6, 7], max_new_tokens=4, greedy=False, top_k=5, seed=1, stop_at_eos=False)
    assert len(sampled) == 4
    lm = load(str(ck))
    text = Text("The quick brown fox jumps over the lazy dog. " * 12, "fox")
    ref = perplexity(lm.model, lm.tokenizer, text, seq_len=32, progress=False)
    ids = lm.tokenizer(text.text, add_special_tokens=False)["input_ids"]
    got = g.perplexity(ids, seq_len=32)
    assert got["windows"] == ref["windows"] and got["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)


def test_perplexity_with_a_bos_adding_tokenizer_matches_pytorch(tmp_path):
    """Windows start with an unscored BOS in onnxruntime too when the tokenizer adds one (as Gemma's does: without
    it Gemma-3-270M's int8 ONNX scored PPL 481 where PyTorch and llama.cpp score 48)."""
    from edgeprune.devices.ort_generate import OrtGenerator
    from edgeprune.export.onnx import export_onnx
    from tokenizers.processors import TemplateProcessing

    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.data import Text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load
    from edgeprune.models.tiny import build_tiny

    lm = build_tiny("llama")
    lm.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                                       special_tokens=[("<s>", 256)])
    ck = save_checkpoint(lm, tmp_path / "ck", {})
    export_onnx(ck, tmp_path / "onnx")
    lm = load(str(ck))
    g = OrtGenerator(tmp_path / "onnx", threads=1)
    assert g.special_prefix() == [256] == lm.tokenizer("a")["input_ids"][:1]
    text = Text("The quick brown fox jumps over the lazy dog. " * 4, "fox")
    ref = perplexity(lm.model, lm.tokenizer, text, seq_len=32, progress=False)
    got = g.perplexity(lm.tokenizer(text.text, add_special_tokens=False)["input_ids"], seq_len=32)
    assert got["windows"] == ref["windows"] == 5 and got["prefix"] == [256]
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)


def test_fp16_int8_and_optimizer_paths(tmp_path, tiny_exports):
    """The conversions run end to end and pass their (dtype-specific) parity check on a tiny model."""
    import onnx
    from edgeprune.export.onnx import check_onnx, export_onnx

    ck, _, _, _ = tiny_exports["pruned"]
    for dtype, optimize, recipe in (("fp16", False, None), ("int8", False, None), ("int8", False, "smooth-hybrid"),
                                    ("fp32", True, None)):
        info = export_onnx(ck, tmp_path / f"{dtype}-{recipe}", dtype, optimize=optimize, n_tokens=4,
                           int8_recipe=recipe)
        assert info["parity"]["passed"] and info["dtype"] == dtype and info["optimized"] is optimize
    assert info["parity"]["max_abs_logit_diff"] < 1e-4  # the optimized fp32 graph
    int8 = onnx.load(str(tmp_path / "int8-None" / "model.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "MatMul" in ops  # attention matmuls stay float
    # the tied lm_head and the embedding read one quantized table: no [vocab, hidden]-sized tensor twice
    vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    tables = [t.name for t in int8.graph.initializer if t.dims and t.dims[0] == vocab and len(t.dims) >= 2
              and t.data_type == onnx.TensorProto.UINT8]
    assert len(tables) == 1, tables
    gbq, = (n for n in int8.graph.node if n.op_type == "GatherBlockQuantized")
    head, = (n for n in int8.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    assert gbq.input[0] == head.input[1] == tables[0]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8-smooth-hybrid" / "model.onnx")).graph.node}
    assert {"MatMulNBits", "DynamicQuantizeMatMul"} <= ops
    again = check_onnx(tmp_path / "int8-None", ck, n_tokens=4)
    assert again["passed"] and again["dtype"] == "int8"


def test_external_data(tmp_path, tiny_exports, monkeypatch):
    import edgeprune.export.onnx as ox
    import edgeprune.export.onnx_files as files

    monkeypatch.setattr(files, "EXTERNAL_DATA_BYTES", 1000)
    ck, _, _, _ = tiny_exports["qwen2"]
    info = ox.export_onnx(ck, tmp_path / "ext", n_tokens=4)
    assert info["external_data"] and (tmp_path / "ext" / "model.onnx.data").is_file()
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 1_000_000 and info["parity"]["passed"]


def test_full_trace_fallback(tmp_path, tiny_exports, monkeypatch):
    """A graph input the weight writer cannot map falls back to the full trace, with the same parity."""
    import edgeprune.export.onnx as ox
    import edgeprune.export.onnx_trace as trace
    from edgeprune.export.onnx_weights import UnresolvedWeight

    def unresolved(*a, **k):
        raise UnresolvedWeight("x")

    monkeypatch.setattr(trace, "attach_weights", unresolved)
    ck, _, _, _ = tiny_exports["pruned"]
    info = ox.export_onnx(ck, tmp_path / "full", n_tokens=4)
    assert info["weights"] == "full trace" and info["parity"]["passed"]
    assert info["parity"]["max_abs_logit_diff"] < 1e-4


def test_bad_inputs_leave_nothing(tmp_path, tiny_exports, monkeypatch):
    import edgeprune.export.onnx as ox

    ck, _, _, _ = tiny_exports["llama"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    cases = [
        (tmp_path / "empty", out, "fp32", "not a model directory"),
        (tmp_path / "missing", out, "fp32", "not a model directory"),
        (ck, out, "bf16", "unknown ONNX dtype"),
        (ck, tmp_path / "file" / "out", "fp32", "not writable"),
        (ck, tmp_path / "file", "fp32", "not a directory"),
        (ck, ck, "fp32", "checkpoint directory itself"),
    ]
    for src, dst, dtype, message in cases:
        with pytest.raises(EdgePruneError, match=message) as e:
            ox.export_onnx(src, dst, dtype)
        assert "\n" not in str(e.value)
    with pytest.raises(EdgePruneError, match="int8 recipe"):
        ox.export_onnx(ck, out, "int8", int8_recipe="int3")

    def failed(*a, **k):
        return {"passed": False, "max_abs_logit_diff": 9.0, "tolerance": 1e-3, "cache_max_abs_logit_diff": 0.0,
                "greedy_match": False, "cache_match": True}

    monkeypatch.setattr(ox, "check_parity", failed)
    with pytest.raises(EdgePruneError, match="parity check failed"):
        ox.export_onnx(ck, out, "fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]  # no output, no temp dir


def test_device_module_imports_without_torch():
    code = ("import sys, edgeprune.devices.ort_generate as m; m.OrtGenerator; "
            "bad = sorted(n for n in ('torch', 'transformers', 'edgeprune.models', 'edgeprune.export.onnx') "
            "if n in sys.modules); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


# ---- real model (SmolLM2-135M) -------------------------------------------------------------------------------


def _ppl(d: Path, ids) -> float:
    from edgeprune.devices.ort_generate import OrtGenerator

    return OrtGenerator(d, threads=2).perplexity(ids, seq_len=128)["ppl"]


@pytest.fixture(scope="module")
def wiki_ids(default_lm, data_dir):
    from edgeprune.data import load_text

    text = load_text(str(data_dir / WIKI)).text[:40000]  # ~9k tokens; the PPL uses the first 4096
    return default_lm.tokenizer(text, add_special_tokens=False)["input_ids"][:4096]


@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory, default_lm):
    """The default model's cache directory and a non-uniform pruned copy of it."""
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models import load
    from edgeprune.surgery import apply_plan

    root = tmp_path_factory.mktemp("real")
    lm = load("default")  # a private copy: default_lm must stay untouched
    apply_plan(lm.adapter, real_plan(lm))
    save_checkpoint(lm, root / "pruned-ck", {})
    return {"default": Path(default_lm.source), "pruned": root / "pruned-ck"}, root


@pytest.mark.slow
@pytest.mark.parametrize("model", ["default", "pruned"])
def test_real_model_fp32_and_int8(real_checkpoints, wiki_ids, model):
    from edgeprune.export.onnx import export_onnx

    cks, root = real_checkpoints
    infos = {dtype: export_onnx(cks[model], root / f"{model}-{dtype}", dtype, n_tokens=8)
             for dtype in ("fp32", "int8")}
    for info in infos.values():
        assert info["parity"]["passed"], info["parity"]
    assert infos["fp32"]["parity"]["max_abs_logit_diff"] < 1e-3 and infos["fp32"]["parity"]["greedy_match"]
    assert infos["int8"]["size_bytes"] < 0.5 * infos["fp32"]["size_bytes"]
    if model == "pruned":
        assert len(infos["fp32"]["kv_layers"]) == 29 and set(infos["fp32"]["kv_heads"]) == {1, 2, 3}
    fp32, int8 = _ppl(root / f"{model}-fp32", wiki_ids), _ppl(root / f"{model}-int8", wiki_ids)
    assert int8 <= 1.03 * fp32, (fp32, int8)
