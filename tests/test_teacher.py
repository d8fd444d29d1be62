"""Stored top-k teacher targets: the truncated KL is a proper KL, exact at full width, and the teacher is not kept."""

import pytest
import torch

from edgeprune.data import calibration_batches, load_text
from edgeprune.models.tiny import build_tiny
from edgeprune.recover import distillation_loss
from edgeprune.teacher import teacher_targets, topk_kl


def _targets_from(logits, k):
    top, idx = logits.topk(k, -1)
    lp = top - torch.logsumexp(logits, -1, keepdim=True)
    others = logits.scatter(-1, idx, float("-inf"))
    rest = torch.logsumexp(others, -1) - torch.logsumexp(logits, -1)
    return idx, lp, rest


def test_topk_kl_is_zero_at_agreement_positive_otherwise_and_full_at_full_width():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 40) * 3, torch.randn(2, 5, 40) * 3
    assert topk_kl(t, *_targets_from(t, 8)).item() == pytest.approx(0.0, abs=1e-6)
    assert topk_kl(s, *_targets_from(t, 8)).item() > 0.01
    # k = V - 1: the "rest" outcome is the one remaining token, so the coarsening loses nothing
    assert topk_kl(s, *_targets_from(t, 39)).item() == pytest.approx(distillation_loss(s, t).item(), rel=1e-5)
    # coarsening never increases a KL (data processing inequality) and its gradient is finite
    s.requires_grad_(True)
    for k in (1, 4, 16, 32):
        loss = topk_kl(s, *_targets_from(t, k))
        assert loss.item() <= distillation_loss(s, t).item() + 1e-6
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(g).all()


def test_streamed_targets_match_the_model_and_have_the_right_size():
    lm = build_tiny("llama")
    windows = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), 5, 16, seed=2)
    tg = teacher_targets(lm.model, windows, k=16, batch_size=2, progress=False)
    assert tg.indices.shape == (5, 16, 16) and tg.indices.dtype == torch.int32 and tg.rest.shape == (5, 16)
    assert tg.nbytes() == 5 * 16 * 16 * 8 + 5 * 16 * 4
    with torch.no_grad():
        logits = lm.model(windows).logits
    idx, lp, rest = _targets_from(logits, 16)
    assert torch.equal(tg.indices.long(), idx)
    assert torch.allclose(tg.logprobs, lp, atol=1e-5) and torch.allclose(tg.rest, rest, atol=1e-4)
    assert topk_kl(logits, *tg.rows(0, 5)).item() == pytest.approx(0.0, abs=1e-5)
    # k is capped below the vocabulary size, so a rest outcome always exists
    assert teacher_targets(lm.model, windows[:1], k=10_000, progress=False).k == logits.shape[-1] - 1


def test_bf16_student_trains_in_float32_and_stays_bf16():
    from edgeprune.plan import LayerPlan, PruningPlan
    from edgeprune.recover import RecoveryConfig, distill
    from edgeprune.surgery import apply_plan

    teacher = build_tiny("llama", dtype="bfloat16")
    student = build_tiny("llama", dtype="bfloat16")
    apply_plan(student.adapter, PruningPlan([LayerPlan(i, [0, 1, 2], [0], list(range(64))) for i in range(3)]))
    windows = calibration_batches(student.tokenizer, load_text("builtin", "calib"), 8, 16, seed=1)
    before = [p.detach().clone() for p in student.model.parameters()]
    rec = distill(student.model, teacher.model, windows, RecoveryConfig(steps=4, batch_size=2, lr=0.04, top_k=16),
                  progress=False)
    assert all(p.dtype == torch.bfloat16 for p in student.model.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, student.model.parameters(), strict=True)) > 5
    assert rec["top_k"] == 16 and len(rec["kl_steps"]) == 4 and rec["kl_steps"][-1] < rec["kl_steps"][0]
