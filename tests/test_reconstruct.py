import copy

import torch

from edgeprune.checkpoint import save_checkpoint
from edgeprune.models import load
from edgeprune.plan import LayerPlan, PruningPlan
from edgeprune.reconstruct import apply_plan_reconstruct, refit
from edgeprune.surgery import apply_plan

torch.manual_seed(0)
CALIB = torch.randint(0, 250, (64, 32))
HELD_OUT = torch.randint(0, 250, (4, 24))


def plan(adapter) -> PruningPlan:
    return PruningPlan([
        LayerPlan(0, heads=[3, 4, 5], kv_heads=[1], channels=list(range(0, 128, 2))),
        LayerPlan(1, heads=[0, 1, 2, 3, 4, 5], kv_heads=[0, 1], channels=list(range(90))),
        LayerPlan(2, heads=[], kv_heads=[], channels=list(range(128))),
    ])


def output_error(model, dense, ids) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - dense(input_ids=ids).logits).pow(2).mean())


def test_refit_is_exact_least_squares():
    x = torch.randn(500, 6, dtype=torch.float64)
    x[:, 5] = 0.5 * x[:, 0] - x[:, 1] + 0.3  # a removed feature the kept ones explain exactly
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(500, 1, dtype=x.dtype)], 1)
    w2, b2 = refit(w, b, xa.T @ xa, torch.tensor([0, 1, 2, 3, 4]), damp=0.0)
    assert torch.allclose(x[:, :5] @ w2.T + b2, x @ w.T + b, atol=1e-6)


def test_reconstruction_keeps_shapes_and_beats_plain_surgery(tiny):
    dense = copy.deepcopy(tiny.model)
    plain = copy.deepcopy(tiny)
    apply_plan(plain.adapter, plan(plain.adapter))
    apply_plan_reconstruct(tiny.adapter, plan(tiny.adapter), CALIB, progress=False)
    assert tiny.adapter.shapes() == plain.adapter.shapes()
    # the refit minimises each projection's error on the calibration tokens, layer after layer
    assert output_error(tiny.model, dense, CALIB) < output_error(plain.model, dense, CALIB)


def test_identity_plan_reconstruct_changes_nothing(tiny):
    before = copy.deepcopy(tiny.model)
    apply_plan_reconstruct(tiny.adapter, PruningPlan.identity(tiny.adapter), CALIB, progress=False)
    assert output_error(tiny.model, before, HELD_OUT) == 0


def test_reconstructed_checkpoint_reloads(tiny, tmp_path):
    apply_plan_reconstruct(tiny.adapter, plan(tiny.adapter), CALIB, progress=False)
    save_checkpoint(tiny, tmp_path / "ck", {"method": "test"})
    again = load(str(tmp_path / "ck"))
    assert again.adapter.layers[0].attention_projections().o.bias is not None  # the refit's bias survives
    assert output_error(again.model, tiny.model, HELD_OUT) < 1e-10


def test_bias_refit_mean_equals_the_gram_ones_column(tiny):
    """The down_proj bias refit reads its inputs' mean (no (d+1)^2 Gram): the Gram's ones column over its count."""
    from edgeprune.data import calibration_batches, load_text
    from edgeprune.reconstruct import gram_of_input, mean_of_input
    from edgeprune.scoring.calibration import capture_layer0_inputs

    batches = calibration_batches(tiny.tokenizer, load_text("builtin", "calib"), 4, 32, seed=0)
    inputs = capture_layer0_inputs(tiny.adapter, batches, 2)
    layer = tiny.adapter.layers[0]
    down = layer.mlp_projections().down
    gram = gram_of_input(layer.layer, down, inputs)
    d = down.in_features
    assert gram[d, d] == 4 * 32
    torch.testing.assert_close(mean_of_input(layer.layer, down, inputs), gram[:d, d] / gram[d, d], rtol=1e-12,
                               atol=1e-15)
