import copy

import pytest
import torch

from edgeprune.data import calibration_batches, load_text
from edgeprune.errors import EdgePruneError
from edgeprune.models.tiny import build_tiny
from edgeprune.prune import PruneConfig, prune_model
from edgeprune.recover import RecoveryConfig, distill, distillation_loss


def _kl(student, teacher, windows) -> float:
    with torch.no_grad():
        return distillation_loss(student(windows).logits, teacher(windows).logits).item()


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert distillation_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(a, a + torch.randn_like(a)).item() > 0.01


def test_recovery_brings_the_pruned_model_back_towards_the_dense_one():
    text = load_text("builtin", "calib")
    lm = build_tiny("llama")
    teacher = copy.deepcopy(lm.model).eval()
    held_out = calibration_batches(lm.tokenizer, load_text("builtin", "eval"), 8, 32, seed=5)
    cfg = dict(ratio=0.4, scorer="piem", allocator="uniform", rounds=1, reconstruct=False, n_samples=8, seq_len=32)
    plain = build_tiny("llama")
    prune_model(plain, PruneConfig(**cfg), text, progress=False)
    record = prune_model(lm, PruneConfig(**cfg, recover_steps=30, recover_lr=0.04), text, progress=False)
    rec = record["recovery"]
    assert rec["config"]["steps"] == 30 and rec["tokens"] == 30 * 4 * 32
    assert rec["kl_curve"][-1] < rec["kl_curve"][0]
    # the same plan, and the distilled student is closer to the dense teacher on text it never trained on
    assert [s.to_dict() for s in lm.adapter.shapes()] == [s.to_dict() for s in plain.adapter.shapes()]
    assert _kl(lm.model, teacher, held_out) < 0.8 * _kl(plain.model, teacher, held_out)
    # gradients are off again and the frozen embedding did not move
    assert all(p.grad is None for p in lm.model.parameters())
    assert torch.equal(lm.model.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


def test_no_recovery_by_default():
    record = prune_model(build_tiny("llama"), PruneConfig(0.2, n_samples=4, seq_len=16), load_text("builtin", "calib"),
                         progress=False)
    assert record["recovery"] is None


@pytest.mark.parametrize("bad", [dict(steps=-1), dict(lr=0.0), dict(batch_size=0), dict(ce_weight=1.5),
                                 dict(temperature=0.0), dict(freeze_layers=-1), dict(autocast="bf16"),
                                 dict(lr_rule="relative")])
def test_bad_recovery_options_are_one_line_errors(bad):
    with pytest.raises(EdgePruneError):
        RecoveryConfig(**{"steps": 1, **bad}).validate()


def test_distill_needs_enough_windows():
    lm = build_tiny("llama")
    with pytest.raises(EdgePruneError, match="needs 8 windows"):
        distill(lm.model, lm.model, torch.zeros(3, 8, dtype=torch.long), RecoveryConfig(steps=2), progress=False)


def test_cross_entropy_share_mixes_into_the_loss():
    lm = build_tiny("llama")
    teacher = copy.deepcopy(lm.model).eval()
    windows = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), 4, 16, seed=1)
    before = [p.detach().clone() for p in lm.model.parameters()]
    # the student starts equal to the teacher, where distillation alone has zero gradient and the KL stays 0:
    # only the next-token share can move it away (the second step's KL > 0)
    rec = distill(lm.model, teacher, windows, RecoveryConfig(steps=2, batch_size=2, ce_weight=0.5), progress=False)
    assert rec["kl_curve"][0] > 1e-4
    assert any(not torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))


def test_frozen_lower_layers_do_not_move_and_the_others_do():
    """``freeze_layers``: the first N decoder layers keep their weights (no gradient reaches them), the rest train."""
    lm = build_tiny("llama")
    teacher = copy.deepcopy(lm.model).eval()
    layers = lm.adapter.layers
    with torch.no_grad():  # a student that differs from the teacher, so the KL has a gradient
        for p in layers[-1].layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = [[p.detach().clone() for p in layer.layer.parameters()] for layer in layers]
    windows = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), 4, 16, seed=1)
    distill(lm.model, teacher, windows, RecoveryConfig(steps=2, batch_size=2, lr=1e-2, freeze_layers=1),
            progress=False)
    moved = [any(not torch.equal(a, b) for a, b in zip(old, layer.layer.parameters(), strict=True))
             for old, layer in zip(before, layers, strict=True)]
    assert moved[0] is False and all(moved[1:])
    assert all(p.requires_grad for p in layers[0].layer.parameters())  # switched back on afterwards


@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_bf16_autocast_modes(mode, monkeypatch):
    """``autocast``: on/off as asked; auto follows placement.native_bf16 (faked both ways here)."""
    import edgeprune.models.placement as placement

    lm = build_tiny("llama")
    teacher = copy.deepcopy(lm.model).eval()
    windows = calibration_batches(lm.tokenizer, load_text("builtin", "calib"), 4, 16, seed=1)
    for native in (True, False):
        monkeypatch.setattr(placement, "native_bf16", lambda device, native=native: native)
        rec = distill(copy.deepcopy(lm.model), teacher, windows, RecoveryConfig(steps=2, batch_size=2, autocast=mode),
                      progress=False)
        assert rec["bf16_autocast"] is (mode == "on" or (mode == "auto" and native))
        assert all(torch.isfinite(torch.tensor(rec["kl_steps"])))


def test_before_recovery_hook_sees_the_pruned_model_before_distillation():
    text = load_text("builtin", "calib")
    cfg = dict(ratio=0.4, scorer="piem", allocator="uniform", rounds=1, reconstruct=False, n_samples=8, seq_len=32)
    plain = build_tiny("llama")
    prune_model(plain, PruneConfig(**cfg), text, progress=False)
    seen = {}

    def hook(lm):
        seen["state"] = {k: v.clone() for k, v in lm.model.state_dict().items()}

    lm = build_tiny("llama")
    prune_model(lm, PruneConfig(**cfg, recover_steps=5, recover_lr=0.04), text, progress=False, before_recovery=hook)
    # the hook saw exactly what pruning without recovery gives; distillation changed the model afterwards
    assert seen["state"].keys() == plain.model.state_dict().keys()
    assert all(torch.equal(seen["state"][k], v) for k, v in plain.model.state_dict().items())
    assert any(not torch.equal(seen["state"][k], v) for k, v in lm.model.state_dict().items())
    # without recovery there is nothing to be before: the hook is not called
    seen.clear()
    prune_model(build_tiny("llama"), PruneConfig(**cfg), text, progress=False, before_recovery=hook)
    assert not seen


def test_learning_rates_are_relative_to_each_tensors_rms():
    from edgeprune.recover import RMS_FLOOR, rms_lrs

    big, small, zero = (torch.nn.Parameter(t) for t in (torch.full((4, 4), 3.0), torch.full((8,), -0.01),
                                                        torch.zeros(3)))
    lrs = [g["lr"] for g in rms_lrs([big, small, zero], 2e-3)]
    assert lrs == pytest.approx([6e-3, 2e-5, 2e-3 * RMS_FLOOR])


def test_a_tensor_ten_times_larger_takes_ten_times_larger_steps():
    # the same model with one weight scaled by 10 (and its input scaled back): the update of that weight scales
    # with it, so its relative step, and the function learned, stay the same
    text = load_text("builtin", "calib")
    a, b = build_tiny("llama"), build_tiny("llama")
    for lm, scale in ((a, 1.0), (b, 10.0)):
        mlp = lm.adapter.layers[0].mlp_projections()
        with torch.no_grad():
            mlp.down.weight.mul_(scale)
            mlp.up.weight.div_(scale)  # down(act(gate) * up / s) * s: the same function
    windows = calibration_batches(a.tokenizer, text, 4, 16, seed=1)
    teacher = build_tiny("llama").model
    torch.manual_seed(0)
    with torch.no_grad():  # a teacher the students differ from, so that the gradients are far above Adam's eps
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = [lm.adapter.layers[0].mlp_projections().down.weight.detach().clone() for lm in (a, b)]
    cfg = RecoveryConfig(steps=1, lr=2e-3, batch_size=4, autocast="off")
    for lm in (a, b):
        rec = distill(lm.model, teacher, windows, cfg, progress=False)
    assert rec["config"]["lr_rule"] == "rms"
    steps = [(lm.adapter.layers[0].mlp_projections().down.weight - w0).abs().mean().item()
             for lm, w0 in zip((a, b), before, strict=True)]
    assert steps[1] == pytest.approx(10 * steps[0], rel=0.05)
