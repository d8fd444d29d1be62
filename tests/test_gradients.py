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


def _grads(lm, batches, chunk_bytes):
    from edgeprune.scoring.calibration import backward_next_token_loss

    params = [p for n, p in lm.model.named_parameters() if ".layers." in n]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        backward_next_token_loss(lm.model, batches, micro_batch=3, progress=False, chunk_bytes=chunk_bytes)
        return [p.grad.clone() for p in params]
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)


def test_chunked_logits_give_the_unchunked_gradients():
    """The loss backpropagated a few positions' logits at a time (and once through the layers) gives the same
    gradients as one cross-entropy over all logits, for a plain head and Gemma's softcapped one."""
    for family in ("llama", "gemma3_text"):
        lm = build_tiny(family)
        lm.model.requires_grad_(False)
        if family == "gemma3_text":
            lm.model.config.final_logit_softcapping = 3.0  # small, so the cap bends the tiny model's logits
        batches = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), 6, 32, seed=0)
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        full = _grads(lm, batches, None)
        chunked = _grads(lm, batches, 4 * vocab * 5)  # 5 positions per chunk: chunks cross the windows' ends
        assert len(full) > 4
        for a, b in zip(full, chunked, strict=True):  # float32 rounding: other GEMM shapes, other sum orders
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
        if family == "gemma3_text":  # the cap matters: without it the gradients differ
            lm.model.config.final_logit_softcapping = None
            other = _grads(lm, batches, None)
            assert not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
                           for a, b in zip(full, other, strict=True))
