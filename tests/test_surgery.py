import copy
import json

import pytest
import torch

from edgeprune.checkpoint import save_checkpoint
from edgeprune.errors import EdgePruneError
from edgeprune.models import load
from edgeprune.plan import LayerPlan, PruningPlan, compose
from edgeprune.surgery import apply_plan, mask_plan

IDS = torch.tensor([[3, 17, 99, 45, 200, 7, 64, 31, 12, 150, 88, 9]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def nonuniform_plan(adapter) -> PruningPlan:
    """Different widths in every layer: a KV group removed, query heads removed inside groups, the attention
    block removed, MLP channels removed."""
    return PruningPlan([
        LayerPlan(0, heads=[3, 4, 5], kv_heads=[1], channels=list(range(0, 128, 2))),
        LayerPlan(1, heads=[0, 2, 3, 5], kv_heads=[0, 1], channels=list(range(100))),
        LayerPlan(2, heads=[], kv_heads=[], channels=[1, 5, 9, 77]),
    ])


def test_identity_plan_changes_nothing(tiny):
    before = logits(tiny.model)
    apply_plan(tiny.adapter, PruningPlan.identity(tiny.adapter))
    assert torch.equal(logits(tiny.model), before)


def test_surgery_equals_masking(tiny):
    masked = copy.deepcopy(tiny.model)
    from edgeprune.adapters import get_adapter

    plan = nonuniform_plan(tiny.adapter)
    mask_plan(get_adapter(masked), plan)
    apply_plan(tiny.adapter, plan)
    assert [s.num_heads for s in tiny.adapter.shapes()] == [3, 4, 0]
    assert tiny.adapter.layers[0].attention_projections().q.out_features == 48  # physically smaller
    assert torch.allclose(logits(tiny.model), logits(masked), atol=1e-5)


def test_removing_zero_units_changes_nothing(tiny):
    plan = nonuniform_plan(tiny.adapter)
    plan.layers[2] = LayerPlan(2, [0, 1, 2], [0], list(range(64)))
    mask_plan(tiny.adapter, plan)  # the units the plan removes now have zero weights
    before = logits(tiny.model)
    apply_plan(tiny.adapter, plan)
    assert torch.allclose(logits(tiny.model), before, atol=1e-6)


def test_generation_with_kv_cache_after_removing_attention(tiny):
    """Layer 0 without attention must still keep the cache's sequence length (generation reads it there)."""
    plan = nonuniform_plan(tiny.adapter)
    plan.layers[0] = LayerPlan(0, [], [], list(range(128)))
    plan.layers[2] = LayerPlan(2, [0, 1, 2], [0], list(range(128)))
    apply_plan(tiny.adapter, plan)
    m = tiny.model
    with torch.no_grad():
        cached = m.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = m.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_drop_layers(tiny):
    plan = PruningPlan.identity(tiny.adapter)
    plan.layers[1].drop = True
    ref = copy.deepcopy(tiny.model)
    del ref.model.layers[1]
    ref.model.layers[1].self_attn.layer_idx = 1
    ref.config.num_hidden_layers = 2
    apply_plan(tiny.adapter, plan)
    assert len(tiny.adapter.layers) == 2 and tiny.model.config.num_hidden_layers == 2
    assert torch.allclose(logits(tiny.model), logits(ref), atol=1e-6)
    with torch.no_grad():
        out = tiny.model.generate(IDS, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == IDS.shape[1] + 3


def test_illegal_plans_are_rejected(tiny):
    plan = PruningPlan.identity(tiny.adapter)
    plan.layers[0] = LayerPlan(0, heads=[0, 1, 3], kv_heads=[0, 1], channels=list(range(128)))
    with pytest.raises(EdgePruneError, match="same number of query heads"):
        apply_plan(tiny.adapter, plan)
    plan.layers[0] = LayerPlan(0, heads=[0, 1, 2], kv_heads=[1], channels=list(range(128)))
    with pytest.raises(EdgePruneError):
        apply_plan(tiny.adapter, plan)
    every = PruningPlan.identity(tiny.adapter)
    for lp in every.layers:
        lp.drop = True
    with pytest.raises(EdgePruneError, match="every decoder layer"):
        apply_plan(tiny.adapter, every)


def test_compose_maps_back_to_original_indices(tiny):
    first = nonuniform_plan(tiny.adapter)
    ref = copy.deepcopy(tiny.model)
    from edgeprune.adapters import get_adapter

    apply_plan(tiny.adapter, first)
    second = PruningPlan([LayerPlan(0, [1, 2], [0], list(range(0, 64, 2))),
                          LayerPlan(1, [0, 1], [0], list(range(50))),
                          LayerPlan(2, [], [], [0, 3])])
    apply_plan(tiny.adapter, second)
    ref_adapter = get_adapter(ref)
    apply_plan(ref_adapter, compose(first, second))
    assert torch.allclose(logits(tiny.model), logits(ref), atol=1e-6)


def test_uniform_checkpoint_loads_in_plain_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = PruningPlan([LayerPlan(i, [0, 1, 2], [0], list(range(0, 128, 2))) for i in range(3)])
    apply_plan(tiny.adapter, plan)
    save_checkpoint(tiny, tmp_path / "ck", {"plan": plan.to_dict()})
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["model_type"] == tiny.adapter.family and "auto_map" not in cfg
    assert not (tmp_path / "ck" / "modeling_edgeprune.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.allclose(logits(plain), logits(tiny.model), atol=1e-6)
    ours = load(str(tmp_path / "ck"))
    assert torch.allclose(logits(ours.model), logits(tiny.model), atol=1e-6)
    assert ours.manifest["layout"] == "uniform"


def test_per_layer_checkpoint_loads_with_remote_code(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    apply_plan(tiny.adapter, nonuniform_plan(tiny.adapter))
    save_checkpoint(tiny, tmp_path / "ck", {})
    d = tmp_path / "ck"
    assert (d / "modeling_edgeprune.py").is_file()
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pkl"))
    plain = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    assert torch.allclose(logits(plain), logits(tiny.model), atol=1e-6)
    ours = load(str(d))
    assert ours.adapter.shapes() == tiny.adapter.shapes()
    assert torch.allclose(logits(ours.model), logits(tiny.model), atol=1e-6)
    with torch.no_grad():
        a = ours.model.generate(IDS, max_new_tokens=5, do_sample=False)
        b = plain.generate(IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    import edgeprune.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_json", boom)
    with pytest.raises(OSError):
        save_checkpoint(tiny, tmp_path / "ck", {})
    assert list(tmp_path.iterdir()) == []


def test_per_layer_checkpoint_loads_without_prompting(tiny, tmp_path):
    """edgeprune loads its own per-layer format with its packaged code: no remote-code prompt, no stdin."""
    import subprocess
    import sys

    apply_plan(tiny.adapter, nonuniform_plan(tiny.adapter))
    save_checkpoint(tiny, tmp_path / "ck", {})
    code = f"from edgeprune.models import load; print(load({str(tmp_path / 'ck')!r}).adapter.shapes()[2])"
    p = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert "custom code" not in p.stdout + p.stderr
    assert "num_heads=0" in p.stdout


def test_cut_weights_mapped_pages_are_released_and_the_model_is_unchanged(tmp_path, monkeypatch):
    """A checkpoint loaded zero-copy from safetensors: surgery releases the mapped pages of the weights it
    replaced (madvise on whole pages of dead storages only), and the pruned model computes exactly what it
    computes without the release; the dropped layer's pages go too."""
    import edgeprune.heap as heap
    import edgeprune.reconstruct as reconstruct
    from edgeprune.data import calibration_batches, load_text
    from edgeprune.models.tiny import build_tiny

    big = build_tiny("llama", hidden_size=256, intermediate_size=2048, num_attention_heads=8,
                     num_key_value_heads=4, num_hidden_layers=3)
    ckpt = save_checkpoint(big, tmp_path / "ck", {})
    plan = PruningPlan.identity(big.adapter)
    for lp in plan.layers[:2]:
        lp.channels, lp.heads, lp.kv_heads = lp.channels[::2], lp.heads[:4], lp.kv_heads[:2]
    plan.layers[2].drop = True
    batches = calibration_batches(big.tokenizer, load_text("builtin", "calib"), 2, 32, seed=0)
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    released, real = [], heap.release_file_pages

    def spy(dead, live):
        released.append(real(dead, live))
        return released[-1]

    outs = {}
    for mode in ("none", "release"):
        monkeypatch.setattr(heap, "release_file_pages", spy if mode == "release" else lambda dead, live: 0)
        monkeypatch.setattr(reconstruct, "release_file_pages", heap.release_file_pages)
        for how in ("plain", "refit"):
            lm = load(str(ckpt))
            assert heap._file_maps()  # the weights are mapped from the checkpoint's file
            with torch.no_grad():
                lm.model(ids)  # every page read once
            p = copy.deepcopy(plan)
            if how == "plain":
                apply_plan(lm.adapter, p)
            else:
                reconstruct.apply_plan_reconstruct(lm.adapter, p, batches, progress=False)
            with torch.no_grad():
                outs[mode, how] = lm.model(ids).logits
    for how in ("plain", "refit"):
        assert torch.equal(outs["release", how], outs["none", how])
    assert sum(released) > 2 * 256 * 2048 * 4  # at least the cut MLP weights of one layer, both passes


def test_release_never_touches_live_pages():
    from edgeprune.heap import _minus

    page = 4096
    assert _minus(0, 10 * page, [], page) == [(0, 10 * page)]
    # a live range partly on pages 2 and 5: pages 2..5 stay
    assert _minus(0, 10 * page, [(2 * page + 100, 3 * page)], page) == [(0, 2 * page), (6 * page, 10 * page)]
    assert _minus(3 * page, 4 * page, [(0, 10 * page)], page) == []
