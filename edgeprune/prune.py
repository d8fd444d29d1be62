"""Prune a loaded model: score -> (sensitivity) -> allocate -> select -> surgery, in one or several rounds."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from edgeprune.allocation import ALLOCATORS
from edgeprune.allocation.base import prunable_total
from edgeprune.config import PruneConfig, recipe_notes
from edgeprune.data import Text, calibration_batches
from edgeprune.models.info import param_counts
from edgeprune.models.placement import input_device
from edgeprune.plan import PruningPlan, compose
from edgeprune.reconstruct import apply_plan_reconstruct
from edgeprune.recover import distill
from edgeprune.scoring import make_scorer, score_model
from edgeprune.selection import build_plan
from edgeprune.sensitivity import SENSITIVITIES
from edgeprune.surgery import apply_plan
from edgeprune.teacher import teacher_targets

__all__ = ["PruneConfig", "compensation_biases", "prune_checkpoint", "prune_model"]


def compensation_biases(adapter, plan: PruningPlan, means: dict) -> tuple[dict, dict]:
    """FLAP's bias compensation: the removed units' mean contribution on calibration text, added to the output
    projection's bias, so the layer's average output is unchanged."""
    attn, mlp = {}, {}
    with torch.no_grad():
        for layer, lp in zip(adapter.layers, plan.layers, strict=True):
            m = means.get(layer.index, {})
            if lp.drop:
                continue
            if layer.has_attention and m.get("attention") is not None and len(lp.heads) < layer.num_heads:
                o = layer.attention_projections().o
                d = layer.head_dim
                gone = [h * d + i for h in range(layer.num_heads) if h not in set(lp.heads) for i in range(d)]
                idx = torch.tensor(gone, dtype=torch.long)
                attn[layer.index] = _times(o.weight[:, idx], m["attention"][idx])
            if layer.has_mlp and m.get("mlp") is not None and len(lp.channels) < layer.intermediate_size:
                down = layer.mlp_projections().down
                keep = set(lp.channels)
                idx = torch.tensor([c for c in range(layer.intermediate_size) if c not in keep], dtype=torch.long)
                mlp[layer.index] = _times(down.weight[:, idx], m["mlp"][idx])
    return attn, mlp


def _times(weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """weight @ mean in float32 on the weight's device, returned in the weight's dtype."""
    return (weight.float() @ mean.to(weight.device, torch.float32)).to(weight.dtype)


def _dense_key(cfg: PruneConfig, calib: Text) -> tuple:
    """What round 1's scores and sensitivities depend on (not the ratio: round 1 always sees the dense model)."""
    return (cfg.scorer, tuple(sorted(cfg.scorer_kwargs().items())), cfg.allocator, cfg.sensitivity,
            cfg.probe_ratio, cfg.attn_unit, cfg.n_samples, cfg.seq_len, cfg.seed, cfg.sensitivity_samples,
            cfg.bias_compensation and not cfg.reconstruct, calib.sha256)


def prune_model(lm, cfg: PruneConfig, calib: Text, progress: bool = True, cache: dict | None = None,
                before_recovery=None) -> dict:
    """Prune ``lm`` in place. Returns a JSON-ready record (plan in original indices, allocation, sensitivities,
    parameter counts, timings).

    ``cache``: a dict shared between calls that prune the same dense model (an ablation over ratios): round 1's
    scores and sensitivities depend on the dense model and the calibration, not on the ratio, and are reused.
    ``before_recovery``: called with ``lm`` after the last round and before distillation (when recovery is on),
    so a benchmark can measure the same pruned model with and without recovery."""
    import resource

    cfg.validate()
    if cfg.stream:
        from edgeprune.errors import EdgePruneError

        raise EdgePruneError("stream=True prunes from the model's files, not a loaded model: use "
                             "edgeprune.prune.prune_checkpoint or edgeprune.stream_prune.stream_prune")
    scorer = make_scorer(cfg.scorer, seed=cfg.seed, **cfg.scorer_kwargs())
    allocator_cls = ALLOCATORS[cfg.allocator]
    sensitivity = SENSITIVITIES[cfg.sensitivity]() if allocator_cls.needs_sensitivity else None
    block_stats = allocator_cls.needs_block_stats or bool(sensitivity and sensitivity.needs_block_stats)
    batches = calibration_batches(lm.tokenizer, calib, cfg.n_samples, cfg.seq_len, cfg.seed)
    probe = batches[: cfg.sensitivity_samples]
    before = param_counts(lm.adapter)
    base_prunable = prunable_total(lm.adapter, cfg.unit_cost)
    plan = PruningPlan.identity(lm.adapter)
    rounds = []
    start = time.perf_counter()
    teacher = windows = None
    if cfg.recover_steps:  # the unpruned model's distributions on the recovery windows, before any cut
        rc = cfg.recovery()
        windows = calibration_batches(lm.tokenizer, calib, rc.steps * rc.batch_size, cfg.seq_len, rc.seed)
        teacher = teacher_targets(lm.model, windows, rc.top_k, rc.temperature, progress=progress,
                                  autocast=rc.use_autocast(input_device(lm.model)))
    for r in range(1, cfg.rounds + 1):
        # each round removes its share of the original budget, measured against the current model
        target = cfg.ratio * base_prunable * r / cfg.rounds
        now = prunable_total(lm.adapter, cfg.unit_cost)
        round_ratio = min(max(0.0, (target - (base_prunable - now)) / now), 0.999)
        key = _dense_key(cfg, calib) if r == 1 else None
        if cache is not None and key in cache:
            scores, sens, means = cache[key]
        else:
            means = {} if cfg.bias_compensation and not cfg.reconstruct else None
            scores = score_model(lm.adapter, scorer, batches, progress=progress, block_stats=block_stats,
                                 keep_gradients=bool(sensitivity and sensitivity.needs_gradients),
                                 compensation=means)
            sens = None
            if sensitivity is not None:
                sens = sensitivity.measure(lm.adapter, scores, probe, cfg.probe_ratio, cfg.attn_unit,
                                           getattr(scores, "gradients", None), progress)
            if cache is not None and key is not None:
                cache[key] = (scores, sens, means)
        alloc = allocator_cls.from_config(cfg, round_ratio).allocate(
            lm.adapter, round_ratio, scores=scores, sensitivities=sens, attn_unit=cfg.attn_unit,
            round_to=cfg.round_to)
        step = build_plan(lm.adapter, scores, alloc)
        if cfg.reconstruct:  # subsumes bias compensation (the refit includes the bias)
            apply_plan_reconstruct(lm.adapter, step, batches, damp=cfg.damp, progress=progress)
        else:
            biases = compensation_biases(lm.adapter, step, means) if means is not None else ({}, {})
            apply_plan(lm.adapter, step, attention_bias=biases[0], mlp_bias=biases[1])
        scores.gradients = None
        plan = compose(plan, step)
        rounds.append({"round": r, "ratio_of_current": round_ratio, "allocation": alloc.to_dict(),
                       "sensitivity": [s.to_dict() for s in sens] if sens else None,
                       "block_influence": [s.blocks for s in scores.layers],
                       "scoring_seconds": scores.meta["seconds"]})
    recovery = None
    if teacher is not None:
        if before_recovery is not None:
            paused = time.perf_counter()
            before_recovery(lm)
            start += time.perf_counter() - paused  # the record's seconds count pruning and recovery only
        recovery = distill(lm.model, teacher, windows, rc, progress=progress)
        del teacher
    after = param_counts(lm.adapter)
    plan.meta.update({"scorer": scorer.describe(), "allocator": cfg.allocator, "ratio": cfg.ratio,
                      "rounds": cfg.rounds, "attn_unit": cfg.attn_unit, "round_to": cfg.round_to})
    return {
        "config": asdict(cfg),
        "notes": recipe_notes(lm.adapter, cfg),
        "calibration": {"text": calib.name, "sha256": calib.sha256, "n_samples": cfg.n_samples,
                        "seq_len": cfg.seq_len, "seed": cfg.seed},
        "plan": plan.to_dict(),
        "layer_shapes": [s.to_dict() for s in lm.adapter.shapes()],
        "rounds": rounds,
        "recovery": recovery,
        "params_before": before,
        "params_after": after,
        "decoder_reduction": 1 - after["decoder_layers"] / before["decoder_layers"],
        "total_reduction": 1 - after["total"] / before["total"],
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def prune_checkpoint(spec: str, cfg: PruneConfig, calib: Text, out_dir, load=None, progress: bool = True) -> dict:
    """`edgeprune prune` and the pipeline's prune stage: load ``spec`` as ``load`` (a ModelLoad: device, dtype;
    default cpu/float32) says, prune it and write the checkpoint (weights, config, tokenizer, manifest) to
    ``out_dir``; with ``cfg.stream`` the model is never loaded whole but streamed layer by layer
    (edgeprune.stream_prune, on the CPU, in ``load.dtype``), which writes the same files. Returns the record, with
    ``source_model``/``source`` as in the manifest."""
    from edgeprune.config import ModelLoad

    load = load or ModelLoad()
    cfg.validate()  # before any model time is spent
    load.validate()
    if cfg.stream:
        from edgeprune.config import check_streamable
        from edgeprune.stream_prune import stream_prune
        from edgeprune.streaming import source_dir

        check_streamable(cfg, load.device)
        record = stream_prune(spec, cfg, calib, out_dir, dtype=load.dtype, progress=progress)
        return {"source_model": spec, "source": str(source_dir(spec)), **record}
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models import load as load_model

    lm = load_model(spec, device=load.device, dtype=load.dtype)
    record = prune_model(lm, cfg, calib, progress=progress)
    save_checkpoint(lm, out_dir, {"source_model": spec, "source": lm.source, **record})
    return {"source_model": spec, "source": lm.source, **record}
