"""Real-model tests on SmolLM2-135M (slow; run in CI by `make test`)."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from edgeprune.adapters import get_adapter
from edgeprune.plan import LayerPlan, PruningPlan
from edgeprune.surgery import apply_plan, mask_plan

pytestmark = pytest.mark.slow


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_surgery_equals_masking_on_the_real_model(fresh_default):
    lm = fresh_default
    ids = lm.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(0)
    plan = PruningPlan.identity(lm.adapter)
    for lp in plan.layers:  # different widths per layer, GQA groups intact
        kv = sorted(torch.randperm(3, generator=gen)[: 1 + lp.index % 3].tolist())
        lp.kv_heads, lp.heads = kv, [h for h in range(9) if h // 3 in kv]
        keep = 1536 - 64 * (lp.index % 7)
        lp.channels = sorted(torch.randperm(1536, generator=gen)[:keep].tolist())
    masked = copy.deepcopy(lm.model)
    mask_plan(get_adapter(masked), plan)
    apply_plan(lm.adapter, plan)
    assert not lm.adapter.shapes()[0] == lm.adapter.shapes()[1]
    a, b = _logits(lm.model, ids), _logits(masked, ids)
    # fp32 sums over smaller matrices round differently: ~1e-5 relative to the logit scale
    assert (a - b).abs().max() / b.abs().max() < 2e-5


def test_prune_cli_checkpoint_loads_everywhere(tmp_path, data_dir, default_lm):
    """The README's first example (the default recipe: LSPS gives per-layer widths), one round to keep it short."""
    out = tmp_path / "p20"
    p = subprocess.run([sys.executable, "-m", "edgeprune", "prune", "default", "--ratio", "0.2", "--scorer", "piem",
                        "--calib", str(data_dir / "wikitext-2" / "tokens" / "valid.txt"), "--n-samples", "16",
                        "--rounds", "1", "-o", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    assert "total parameters" in p.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["scorer"] == "piem" and abs(manifest["decoder_reduction"] - 0.2) < 0.01
    assert len(manifest["plan"]["layers"]) == 30 and manifest["calibration"]["sha256"]
    from transformers import AutoModelForCausalLM

    assert manifest["config"]["allocator"] == "lsps" and manifest["config"]["reconstruct"]
    plain = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    from edgeprune.models import load

    ours = load(str(out))
    ids = torch.tensor([[504, 3458, 282, 4649, 314]])
    assert torch.allclose(_logits(plain, ids), _logits(ours.model, ids), atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "edgeprune", "eval", str(out), "--data",
                        str(data_dir / "wikitext-2" / "wiki.test.raw"), "--max-tokens", "4096",
                        "--json", str(tmp_path / "e.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    pruned_ppl = json.loads((tmp_path / "e.json").read_text())["ppl"]["ppl"]
    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity

    dense = perplexity(default_lm.model, default_lm.tokenizer,
                       load_text(str(data_dir / "wikitext-2" / "wiki.test.raw")), 128, max_tokens=4096,
                       progress=False)["ppl"]
    assert dense < pruned_ppl < 20 * dense  # pruning costs something, but the model still works


def test_per_layer_real_checkpoint_loads_in_plain_transformers(tmp_path, fresh_default):
    from transformers import AutoModelForCausalLM

    from edgeprune.checkpoint import save_checkpoint

    lm = fresh_default
    plan = PruningPlan.identity(lm.adapter)
    plan.layers[3] = LayerPlan(3, [], [], list(range(1536)))  # no attention in layer 3
    plan.layers[5] = LayerPlan(5, list(range(6)), [0, 1], list(range(0, 1536, 2)))
    plan.layers[29].drop = True
    apply_plan(lm.adapter, plan)
    save_checkpoint(lm, tmp_path / "ck", {})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", trust_remote_code=True)
    ids = lm.tokenizer("Once upon a time", return_tensors="pt").input_ids
    assert torch.allclose(_logits(plain, ids), _logits(lm.model, ids), atol=1e-5)
    with torch.no_grad():
        a = plain.generate(ids, max_new_tokens=8, do_sample=False)
        b = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_distillation_recovers_a_pruned_real_model(fresh_default, data_dir):
    """A few distillation steps on WikiText-2 valid lower the pruned model's PPL on WikiText-2 test."""
    from edgeprune.data import calibration_batches, load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.prune import PruneConfig, prune_model
    from edgeprune.recover import RecoveryConfig, distill

    lm = fresh_default
    teacher = copy.deepcopy(lm.model).eval()
    calib = load_text(str(data_dir / "wikitext-2" / "tokens" / "valid.txt"), "calib")
    test = load_text(str(data_dir / "wikitext-2" / "wiki.test.raw"))
    prune_model(lm, PruneConfig(0.2, "wanda-sp", "uniform", rounds=1, reconstruct=False, n_samples=16), calib,
                progress=False)

    def ppl():
        return perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=2048, progress=False)["ppl"]

    before = ppl()
    cfg = RecoveryConfig(steps=12, batch_size=2)
    record = distill(lm.model, teacher, calibration_batches(lm.tokenizer, calib, 24, 128, seed=1), cfg,
                     progress=False)
    after = ppl()
    print(f"recovery: PPL {before:.1f} -> {after:.1f}")
    assert record["kl_curve"][-1] < record["kl_curve"][0]
    assert after < 0.85 * before, (before, after)
