"""Every model family through every torch-side stage, on tiny random-initialised models: the adapter and the
family table agree with the real modules, every scorer and allocator runs, multi-round + refit + distillation,
surgery equals masking, checkpoints reload in stock transformers, ONNX export passes its parity check and
generates in onnxruntime. (Llama, Mistral and Qwen2 also run through the older per-module tests.)"""

import copy
import json

import pytest
import torch

from edgeprune.adapters import get_adapter
from edgeprune.adapters.base import FusedRows
from edgeprune.adapters.families import LAYER_ROLES, get_family, tensor_name
from edgeprune.checkpoint import save_checkpoint
from edgeprune.data import Text, calibration_batches, load_text
from edgeprune.models import load
from edgeprune.models.info import param_counts
from edgeprune.models.tiny import build_tiny
from edgeprune.plan import LayerPlan, PruningPlan
from edgeprune.prune import PruneConfig, prune_model
from edgeprune.surgery import apply_plan, mask_plan

FAMILIES = ("llama3", "qwen3", "gemma3_text", "phi3", "glm", "glm4")
IDS = torch.tensor([[3, 17, 99, 45, 200, 7, 64, 31, 12, 150, 88, 9]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def nonuniform_plan() -> PruningPlan:
    """A KV group removed, heads removed inside groups, a whole attention block removed, channels removed."""
    return PruningPlan([
        LayerPlan(0, heads=[3, 4, 5], kv_heads=[1], channels=list(range(0, 128, 2))),
        LayerPlan(1, heads=[0, 2, 3, 5], kv_heads=[0, 1], channels=list(range(100))),
        LayerPlan(2, heads=[], kv_heads=[], channels=[1, 5, 9, 77]),
    ])


@pytest.fixture(params=FAMILIES)
def fam_tiny(request):
    return build_tiny(request.param)


@pytest.fixture(scope="module")
def calib():
    """A slice of the built-in calibration text (tokenizing all of it per prune would dominate the time)."""
    return Text(load_text("builtin", "calib").text[:20000], "builtin-calib-slice")


def test_table_names_every_tensor(fam_tiny):
    """tensor_name() finds every role's weight in the state dict, fused rows included, and the adapter's
    projections are those rows."""
    a = fam_tiny.adapter
    spec = a.spec
    state = fam_tiny.model.state_dict()
    for layer in a.layers:
        s = layer.shape
        proj = {**layer.attention_projections()._asdict(), **layer.mlp_projections()._asdict()}
        for role in LAYER_ROLES:
            if not spec.has_role(role):
                continue
            name, rows = tensor_name(spec, role, layer.index, num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                                     head_dim=layer.head_dim, intermediate_size=s.intermediate_size)
            assert name in state, name
            if role in proj:
                t = state[name] if rows is None else state[name][rows]
                assert torch.equal(t, proj[role].weight.detach())
                assert isinstance(proj[role], FusedRows) == (rows is not None)
    for role in ("embed", "final_norm"):
        assert tensor_name(spec, role)[0] in state
    p = param_counts(a)
    assert p["embeddings"] + p["lm_head"] + p["attention"] + p["mlp"] + p["norms"] == p["total"]
    assert len(a.layers[0].norms()) == 6 and a.layers[0].norms().attention_input is not None


def test_family_quirks_are_visible():
    g = build_tiny("gemma3_text").adapter
    assert g.head_dim == 24 != g.hidden_size // g.config.num_attention_heads
    assert g.spec.norm_offset == 1.0 and g.layers[0].norms().mlp_output is not None
    assert g.layers[0].norms().q is not None
    assert build_tiny("phi3").adapter.rotary.rope_dims == 12  # 3/4 of head_dim 16
    glm = build_tiny("glm").adapter
    assert glm.rotary.interleaved and glm.rotary.partial_rotary_factor == 0.5 and glm.layers[0].biases.q
    assert build_tiny("llama3").adapter.rotary.rope_type == "llama3"
    assert not build_tiny("qwen3").adapter.layers[0].biases.q


def test_every_scorer_runs(fam_tiny, calib):
    from edgeprune.scoring import make_scorer, score_model
    from edgeprune.scoring.scorers import SCORERS

    batches = calibration_batches(fam_tiny.tokenizer, calib, 4, 32, seed=0)
    for name in SCORERS:
        s = score_model(fam_tiny.adapter, make_scorer(name), batches, progress=False, block_stats=True)
        for layer, ls in zip(fam_tiny.adapter.layers, s.layers, strict=True):
            assert ls.groups.shape == (layer.num_kv_heads,) and ls.channels.shape == (layer.intermediate_size,)
            assert torch.isfinite(ls.groups).all() and torch.isfinite(ls.channels).all(), name


@pytest.mark.parametrize("allocator", ["uniform", "lsps", "global", "owl", "depth"])
def test_every_allocator_prunes(allocator, calib):
    for fam in FAMILIES:
        lm = build_tiny(fam)
        cfg = PruneConfig(0.3, "piem", allocator, n_samples=4, seq_len=32, sensitivity="bi",
                          bias_compensation=allocator == "global")
        rec = prune_model(lm, cfg, calib, progress=False)
        assert rec["decoder_reduction"] > 0.15, (fam, allocator)
        assert torch.isfinite(logits(lm.model)).all()


def test_multi_round_refit_and_distillation(fam_tiny, calib):
    dense = logits(fam_tiny.model)
    cfg = PruneConfig(0.3, "piem", "lsps", n_samples=4, seq_len=32, sensitivity="loss", rounds=2,
                      reconstruct=True, recover_steps=2, recover_batch=2)
    rec = prune_model(fam_tiny, cfg, calib, progress=False)
    assert len(rec["rounds"]) == 2 and rec["recovery"]["config"]["steps"] == 2
    assert abs(rec["decoder_reduction"] - 0.3) < 0.05
    out = logits(fam_tiny.model)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense)


def test_surgery_equals_masking_and_identity(fam_tiny):
    before = logits(fam_tiny.model)
    apply_plan(fam_tiny.adapter, PruningPlan.identity(fam_tiny.adapter))
    assert torch.equal(logits(fam_tiny.model), before)
    masked = copy.deepcopy(fam_tiny.model)
    mask_plan(get_adapter(masked), nonuniform_plan())
    apply_plan(fam_tiny.adapter, nonuniform_plan())
    assert [s.num_heads for s in fam_tiny.adapter.shapes()] == [3, 4, 0]
    assert [s.intermediate_size for s in fam_tiny.adapter.shapes()] == [64, 100, 4]
    assert sum(p.numel() for p in fam_tiny.model.parameters()) < sum(p.numel() for p in masked.parameters())
    assert torch.allclose(logits(fam_tiny.model), logits(masked), atol=1e-5)
    with torch.no_grad():  # the KV cache still works with per-layer head counts
        a = fam_tiny.model.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=True)
        b = fam_tiny.model.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_ratio_zero_is_identity(fam_tiny, calib):
    before = logits(fam_tiny.model)
    prune_model(fam_tiny, PruneConfig(0.0, "magnitude", "uniform", n_samples=2, seq_len=16), calib,
                progress=False)
    assert torch.equal(logits(fam_tiny.model), before)


def test_uniform_checkpoint_loads_in_stock_transformers(fam_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = PruningPlan([LayerPlan(i, [0, 1, 2], [0], list(range(0, 128, 2))) for i in range(3)])
    apply_plan(fam_tiny.adapter, plan)
    save_checkpoint(fam_tiny, tmp_path / "ck", {})
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model_type"] == fam_tiny.adapter.family and "auto_map" not in cfg
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.allclose(logits(plain), logits(fam_tiny.model), atol=1e-5)
    ours = load(str(tmp_path / "ck"))
    assert ours.adapter.family == fam_tiny.adapter.family and ours.manifest["layout"] == "uniform"


def test_per_layer_checkpoint_loads_with_remote_code(fam_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    apply_plan(fam_tiny.adapter, nonuniform_plan())
    save_checkpoint(fam_tiny, tmp_path / "ck", {})
    d = tmp_path / "ck"
    assert json.loads((d / "config.json").read_text())["model_type"] == f"edgeprune_{fam_tiny.adapter.family}"
    plain = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    assert torch.allclose(logits(plain), logits(fam_tiny.model), atol=1e-5)
    ours = load(str(d))
    assert ours.adapter.shapes() == fam_tiny.adapter.shapes()
    assert torch.allclose(logits(ours.model), logits(fam_tiny.model), atol=1e-5)
    with torch.no_grad():
        a = ours.model.generate(IDS, max_new_tokens=5, do_sample=False)
        b = plain.generate(IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_table_is_consistent():
    for name in FAMILIES:
        spec = get_adapter(build_tiny(name).model).spec
        assert get_family(spec.name) is spec
        for members in spec.fused.values():
            assert len({spec.template(m) for m in members}) == 1


def test_remote_code_default_layout_is_the_tables():
    """models/remote_code.py's in-repo LAYOUT (used by bench/ablate.py) is what the table says for llama, and a
    written copy carries its family's layout."""
    from edgeprune.adapters.families import remote_layout
    from edgeprune.checkpoint import remote_code_source
    from edgeprune.models import remote_code

    assert remote_code.LAYOUT == remote_layout("llama")
    src = remote_code_source("phi3")
    ns: dict = {}
    exec(compile(src.split("\nclass PrunedAttention")[0], "modeling_edgeprune.py", "exec"), ns)
    assert ns["FAMILY"] == "phi3" and ns["LAYOUT"] == remote_layout("phi3")
    assert remote_code.LAYER_KEYS == __import__("edgeprune.adapters.families", fromlist=["x"]).LAYER_KEYS


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_parity_and_generation(family, tmp_path):
    """A per-layer pruned checkpoint of each family exports with a passing parity check (logits, greedy tokens,
    KV-cache steps) and generates in onnxruntime with the same greedy tokens as PyTorch."""
    from edgeprune.devices.ort_generate import OrtGenerator
    from edgeprune.export.onnx import export_onnx

    lm = build_tiny(family)
    plan = nonuniform_plan()
    plan.layers[2] = LayerPlan(2, [0, 1, 2], [0], [1, 5, 9, 77])  # keep a KV cache in the last layer
    apply_plan(lm.adapter, plan)
    save_checkpoint(lm, tmp_path / "ck", {})
    info = export_onnx(tmp_path / "ck", tmp_path / "onnx")
    p = info["parity"]
    assert p["passed"] and p["greedy_match"] and p["cache_match"], p
    # every family's weights resolve (Gemma's folded 1 + w norms too): no full trace holding model copies
    assert info["weights"].startswith("graph traced without parameters"), info["weights"]
    g = OrtGenerator(tmp_path / "onnx", threads=1)
    assert g.kv_heads == {0: 1, 1: 2, 2: 1}
    prompt = IDS[0].tolist()
    new = g.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    with torch.no_grad():
        ref = lm.model.generate(IDS, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, len(prompt):]
    assert new == ref.tolist()


def test_dropping_a_layer_equals_emptying_it(fam_tiny, tmp_path):
    """A dropped layer passes the residual through, like a layer whose every unit is masked; per-layer config
    lists (Gemma's layer_types) follow, and the checkpoint reloads."""
    masked = copy.deepcopy(fam_tiny.model)
    empty = PruningPlan.identity(fam_tiny.adapter)
    empty.layers[1] = LayerPlan(1, [], [], [])
    mask_plan(get_adapter(masked), empty)
    plan = PruningPlan.identity(fam_tiny.adapter)
    plan.layers[1].drop = True
    types = list(getattr(fam_tiny.model.config, "layer_types", None) or [])
    apply_plan(fam_tiny.adapter, plan)
    assert len(fam_tiny.adapter.layers) == 2 and fam_tiny.model.config.num_hidden_layers == 2
    if types:
        assert fam_tiny.model.config.layer_types == [types[0], types[2]]
    assert torch.allclose(logits(fam_tiny.model), logits(masked), atol=1e-5)
    save_checkpoint(fam_tiny, tmp_path / "ck", {})
    assert torch.allclose(logits(load(str(tmp_path / "ck")).model), logits(masked), atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "glm4", "llama", "qwen3"])
def test_the_recipe_note_names_post_block_norms(family):
    """Families that normalise a block's output (Gemma 3, GLM-4) get the measured advice when LSPS or the refit is
    on; the others and the advised recipe get no note."""
    from edgeprune.config import recipe_notes

    adapter = build_tiny(family).adapter
    notes = recipe_notes(adapter, PruneConfig())
    assert bool(notes) == (family in ("gemma3_text", "glm4"))
    assert not recipe_notes(adapter, PruneConfig(allocator="uniform", reconstruct=False))
    if notes:
        assert "--allocator uniform --no-reconstruct" in notes[0] and "\n" not in notes[0]
