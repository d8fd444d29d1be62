"""The gradient term folded into per-unit sums during the backward pass equals the full-gradient Taylor score."""

import torch

from edgeprune.data import calibration_batches, load_text
from edgeprune.models.tiny import build_tiny
from edgeprune.scoring.calibration import accumulate_gradients
from edgeprune.scoring.gradients import checkpointed_layers, unit_taylor
from edgeprune.scoring.scorers import TaylorScorer


def _full(lm, batches, micro_batch):
    grads = accumulate_gradients(lm.adapter, batches, micro_batch=micro_batch, progress=False)
    return [TaylorScorer().score_layer(layer, None, grads) for layer in lm.adapter.layers]


def _close(a, b, rtol=1e-5):
    for x, y in zip(a, b, strict=True):
        for kind in ("groups", "heads", "channels"):
            assert torch.allclose(getattr(x, kind), getattr(y, kind).double(), rtol=rtol, atol=1e-12), kind


def test_hooks_equal_full_gradient_scores_in_one_backward_pass(tiny):
    batches = calibration_batches(tiny.tokenizer, load_text("builtin", "calib"), 6, 32, seed=0)
    ref = _full(tiny, batches, micro_batch=6)
    acc = unit_taylor(tiny.adapter, batches, micro_batch=6, progress=False)
    assert acc.backward_passes == 1
    _close([acc.layer_scores(layer) for layer in tiny.adapter.layers], ref)
    # nothing left behind: no gradients, no hooks, requires_grad restored, checkpointing off again
    assert all(p.grad is None for p in tiny.model.parameters())
    assert all(not m.gradient_checkpointing and not m.training for m in tiny.model.model.layers)
    out = tiny.model(batches[:1]).logits.sum()
    out.backward()  # the hooks are gone: gradients accumulate as usual
    assert tiny.adapter.layers[0].mlp_projections().gate.weight.grad is not None


def test_micro_batches_sum_the_per_batch_scores():
    lm = build_tiny("llama")
    batches = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), 6, 32, seed=0)
    acc = unit_taylor(lm.adapter, batches, micro_batch=2, progress=False)
    assert acc.backward_passes == 3
    # the same as the full-gradient scores of each micro-batch (its loss scaled to the whole set), summed
    parts = []
    for b in range(0, 6, 2):
        scale = batches[b:b + 2, 1:].numel() / batches[:, 1:].numel()
        parts.append([(s, scale) for s in _full(lm, batches[b:b + 2], micro_batch=2)])
    for i, layer in enumerate(lm.adapter.layers):
        got = acc.layer_scores(layer)
        want = sum(s.channels * scale for s, scale in (p[i] for p in parts))
        assert torch.allclose(got.channels, want, rtol=1e-5)


def test_checkpointing_gives_the_same_scores_as_without():
    lm = build_tiny("qwen2")
    batches = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), 4, 32, seed=1)
    a = unit_taylor(lm.adapter, batches, micro_batch=2, checkpointing=True, progress=False)
    b = unit_taylor(lm.adapter, batches, micro_batch=2, checkpointing=False, progress=False)
    _close([a.layer_scores(x) for x in lm.adapter.layers], [b.layer_scores(x) for x in lm.adapter.layers])
    with checkpointed_layers(lm.adapter) as on:
        assert on and all(m.gradient_checkpointing for m in lm.model.model.layers)
        assert not lm.model.model.layers[0].mlp.training  # submodules (dropout) stay in eval mode
