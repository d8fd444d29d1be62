import pytest
import torch

from edgeprune.data import calibration_batches, load_text
from edgeprune.errors import EdgePruneError
from edgeprune.scoring import make_scorer, score_model, scorer_names
from edgeprune.scoring.calibration import capture_layer0_inputs, collect_layer_stats


@pytest.fixture
def batches(tiny):
    return calibration_batches(tiny.tokenizer, load_text("builtin", "calib"), 6, 32, seed=0)


def test_layerwise_pass_reproduces_the_full_model(tiny, batches):
    """Feeding layer outputs forward one layer at a time must give the model's own hidden states."""
    inputs = capture_layer0_inputs(tiny.adapter, batches, micro_batch=4)
    for layer in tiny.adapter.layers:
        _, inputs = collect_layer_stats(layer, inputs)
    mine = torch.cat([h for h, _ in inputs])
    with torch.no_grad():
        ref = tiny.model(batches, output_hidden_states=True).hidden_states[-1]
    # hidden_states[-1] has the final norm applied
    assert torch.allclose(tiny.adapter.final_norm(mine), ref, atol=1e-5)


@pytest.mark.parametrize("name", scorer_names())
def test_every_scorer_scores_every_unit(tiny, batches, name):
    scores = score_model(tiny.adapter, make_scorer(name), batches, micro_batch=4, progress=False)
    assert len(scores.layers) == 3
    for s in scores.layers:
        assert s.groups.shape == (2,) and s.heads.shape == (6,) and s.channels.shape == (128,)
        for t in (s.groups, s.heads, s.channels):
            assert torch.isfinite(t).all() and (t >= 0).all() and t.std() > 0


def test_taylor_matches_autograd(tiny, batches):
    # micro_batch 12: the gradient pass takes all 6 windows in one backward pass, where the per-unit sums
    # folded during the backward pass are exactly the full-gradient Taylor score (scoring.gradients)
    scores = score_model(tiny.adapter, make_scorer("taylor"), batches, micro_batch=12, progress=False)
    model = tiny.model
    logits = model(batches).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batches[:, 1:].reshape(-1))
    layer = tiny.adapter.layers[1]
    m = layer.mlp_projections()
    gg, gu, gd = torch.autograd.grad(loss, [m.gate.weight, m.up.weight, m.down.weight])
    expected = (m.gate.weight * gg).abs().sum(1) + (m.up.weight * gu).abs().sum(1) + (m.down.weight * gd).abs().sum(0)
    assert torch.allclose(scores.layers[1].channels.float(), expected.detach(), rtol=1e-3, atol=1e-9)


def test_magnitude_is_the_norm_of_coupled_weights(tiny):
    s = score_model(tiny.adapter, make_scorer("magnitude"), torch.zeros(1, 2, dtype=torch.long), progress=False)
    m = tiny.adapter.layers[0].mlp_projections()
    ref = torch.sqrt(m.gate.weight.pow(2).sum(1) + m.up.weight.pow(2).sum(1) + m.down.weight.pow(2).sum(0))
    assert torch.allclose(s.layers[0].channels.float(), ref.detach(), rtol=1e-5)


def test_piem_context_term_is_the_output_energy(tiny, batches):
    """The head energy collected by the hooks equals ||x_h W_o[:, h]^T||^2 averaged over tokens."""
    inputs = capture_layer0_inputs(tiny.adapter, batches)
    layer = tiny.adapter.layers[0]
    stats, _ = collect_layer_stats(layer, inputs)
    captured = []
    o = layer.attention_projections().o
    h = o.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        tiny.model(batches)
    h.remove()
    x = captured[0].reshape(-1, 6, 16)
    w = o.weight.view(96, 6, 16)
    energy = torch.einsum("thd,ohd->tho", x, w).pow(2).sum(-1).mean(0)
    assert torch.allclose(stats.head_energy.float(), energy, rtol=1e-4)


def test_piem_weights_are_validated():
    with pytest.raises(EdgePruneError):
        make_scorer("piem", alpha=-1, beta=0, gamma=1)
    with pytest.raises(EdgePruneError, match="unknown scorer"):
        make_scorer("nope")


def test_scores_roundtrip_json(tiny, batches):
    from edgeprune.scoring.base import UnitScores

    s = score_model(tiny.adapter, make_scorer("wanda-sp"), batches, progress=False)
    back = UnitScores.from_dict(s.to_dict())
    assert torch.allclose(back.layers[2].channels, s.layers[2].channels)
    assert back.layers[0].blocks["layer"] > 0


def test_chunked_weight_terms_and_statistics_equal_the_whole_ones(monkeypatch):
    """The per-weight terms (magnitude, Taylor, column norms, outlier ratios) summed over chunks of rows and the
    head energies over chunks of tokens equal the sums over whole tensors (the tiny model's weights fit in one
    chunk by default; here every chunk is one head's rows or one token)."""
    import edgeprune.scoring.base as base
    import edgeprune.scoring.calibration as calibration
    from edgeprune.data import calibration_batches, load_text
    from edgeprune.models.tiny import build_tiny
    from edgeprune.scoring import make_scorer, score_model
    from edgeprune.scoring.calibration import accumulate_gradients
    from edgeprune.scoring.scorers import TaylorScorer

    lm = build_tiny("qwen2")
    batches = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), 4, 32, seed=0)
    grads = accumulate_gradients(lm.adapter, batches, progress=False)  # full gradients: the streamed lens's path

    def run():
        out = []
        for name in ("piem", "taylor", "magnitude", "wanda-sp", "fluctuation"):
            s = score_model(lm.adapter, make_scorer(name), batches, progress=False, block_stats=True)
            out += [(name, i, layer) for i, layer in enumerate(s.layers)]
        with torch.no_grad():
            out += [("taylor-grads", i, TaylorScorer().score_layer(x, None, grads))
                    for i, x in enumerate(lm.adapter.layers)]
        return out

    whole = run()
    layer = lm.adapter.layers[0]
    assert len(base.row_chunks(*layer.mlp_projections().gate.weight.shape)) == 1  # one chunk: the whole weight
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1)  # one head's rows (or one row) per chunk
    monkeypatch.setattr(calibration, "ENERGY_CHUNK_BYTES", 1)  # one token per chunk
    assert len(base.row_chunks(*layer.mlp_projections().gate.weight.shape, multiple=layer.head_dim)) > 4
    chunked = run()
    for (name, i, a), (_, _, b) in zip(whole, chunked, strict=True):
        for kind in ("groups", "heads", "channels"):
            # float64 sums in another order; the head energies and Taylor products are float32 (einsum/GEMM blocking)
            torch.testing.assert_close(getattr(b, kind), getattr(a, kind), rtol=1e-6, atol=1e-12,
                                       msg=f"{name} layer {i} {kind}")
        assert b.blocks == pytest.approx(a.blocks, rel=1e-6)
