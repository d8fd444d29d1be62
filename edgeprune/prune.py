"""Prune a loaded model: score -> (sensitivity) -> allocate -> select -> surgery, in one or several rounds."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch

from edgeprune.allocation import allocate, unit_costs
from edgeprune.allocation.base import check_ratio
from edgeprune.data import Text, calibration_batches
from edgeprune.errors import EdgePruneError
from edgeprune.models.info import param_counts
from edgeprune.plan import PruningPlan, compose
from edgeprune.reconstruct import apply_plan_reconstruct
from edgeprune.recover import RecoveryConfig, distill
from edgeprune.scoring import make_scorer, score_model
from edgeprune.selection import build_plan
from edgeprune.sensitivity import measure
from edgeprune.surgery import apply_plan


@dataclass
class PruneConfig:
    ratio: float
    scorer: str = "piem"
    allocator: str = "uniform"
    attn_unit: str = "group"
    round_to: int = 1
    rounds: int = 1
    n_samples: int = 64
    seq_len: int = 128
    seed: int = 0
    scorer_options: dict = field(default_factory=dict)
    sensitivity: str = "loss"
    probe_ratio: float = 0.3
    tau: float = 1.0
    min_module_ratio: float = 0.0
    max_module_ratio: float = 0.8
    bias_compensation: bool = False
    reconstruct: bool = False  # least-squares refit of o_proj/down_proj on calibration text (reconstruct.py)
    damp: float = 1e-3
    sensitivity_samples: int = 16  # calibration windows for the loss probe (a subset of the calibration set)
    # recovery by distillation from the unpruned model after the last round (recover.py); 0 steps = off
    recover_steps: int = 0
    recover_lr: float = 4e-4
    recover_batch: int = 4
    recover_ce: float = 0.0
    # LSPS latency budget (edgeprune fit): per layer [cost of one KV group, of one MLP channel], e.g. decode ms;
    # the ratio is then the share of that cost removed. None: the parameter budget
    unit_cost: list | None = None

    def recovery(self) -> RecoveryConfig:
        return RecoveryConfig(self.recover_steps, self.recover_lr, self.recover_batch, ce_weight=self.recover_ce,
                              seed=self.seed + 1)

    def validate(self) -> None:
        """One-line errors for every bad option: shared by `edgeprune prune` and `edgeprune run`."""
        from edgeprune.allocation import ALLOCATORS
        from edgeprune.allocation.base import ATTN_UNITS
        from edgeprune.scoring import make_scorer
        from edgeprune.sensitivity import SENSITIVITIES

        check_ratio(self.ratio)
        make_scorer(self.scorer, seed=self.seed, **self.scorer_options)  # unknown scorers and options fail here
        for what, value, known in (("allocator", self.allocator, ALLOCATORS), ("attention unit", self.attn_unit,
                                   ATTN_UNITS), ("sensitivity", self.sensitivity, SENSITIVITIES)):
            if value not in known:
                raise EdgePruneError(f"unknown {what} '{value}'; choose from {', '.join(known)}")
        if self.rounds < 1 or self.round_to < 1 or self.n_samples < 1 or self.seq_len < 2:
            raise EdgePruneError("rounds, round-to and the number of calibration samples must be at least 1, "
                                 "the calibration sequence length at least 2")
        if not 0 < self.probe_ratio < 1:
            raise EdgePruneError("probe-ratio must be in (0, 1)")
        if not 0 <= self.min_module_ratio <= self.max_module_ratio < 1:
            raise EdgePruneError("need 0 <= min-module-ratio <= max-module-ratio < 1")
        if self.unit_cost is not None and (self.allocator != "lsps" or self.attn_unit != "group"):
            raise EdgePruneError("a latency budget (unit_cost) needs the lsps allocator with attention unit 'group'")
        self.recovery().validate()


def _prunable(adapter, unit_cost=None) -> float:
    from edgeprune.allocation.base import priced

    return sum(c.prunable for c in priced(unit_costs(adapter), unit_cost))


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
                o = layer.attention_projections()[3]
                d = layer.head_dim
                gone = [h * d + i for h in range(layer.num_heads) if h not in set(lp.heads) for i in range(d)]
                idx = torch.tensor(gone, dtype=torch.long)
                attn[layer.index] = o.weight[:, idx] @ m["attention"][idx].to(o.weight.dtype)
            if layer.has_mlp and m.get("mlp") is not None and len(lp.channels) < layer.intermediate_size:
                down = layer.mlp_projections()[2]
                keep = set(lp.channels)
                idx = torch.tensor([c for c in range(layer.intermediate_size) if c not in keep], dtype=torch.long)
                mlp[layer.index] = down.weight[:, idx] @ m["mlp"][idx].to(down.weight.dtype)
    return attn, mlp


def _dense_key(cfg: PruneConfig, calib: Text) -> tuple:
    """What round 1's scores and sensitivities depend on (not the ratio: round 1 always sees the dense model)."""
    return (cfg.scorer, tuple(sorted(cfg.scorer_options.items())), cfg.allocator, cfg.sensitivity,
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
    scorer = make_scorer(cfg.scorer, seed=cfg.seed, **cfg.scorer_options)
    batches = calibration_batches(lm.tokenizer, calib, cfg.n_samples, cfg.seq_len, cfg.seed)
    probe = batches[: cfg.sensitivity_samples]
    before = param_counts(lm.adapter)
    base_prunable = _prunable(lm.adapter, cfg.unit_cost)
    plan = PruningPlan.identity(lm.adapter)
    rounds = []
    start = time.perf_counter()
    teacher = copy.deepcopy(lm.model).eval() if cfg.recover_steps else None
    for r in range(1, cfg.rounds + 1):
        # each round removes its share of the original budget, measured against the current model
        target = cfg.ratio * base_prunable * r / cfg.rounds
        now = _prunable(lm.adapter, cfg.unit_cost)
        round_ratio = min(max(0.0, (target - (base_prunable - now)) / now), 0.999)
        key = _dense_key(cfg, calib) if r == 1 else None
        if cache is not None and key in cache:
            scores, sens, means = cache[key]
        else:
            means = {} if cfg.bias_compensation and not cfg.reconstruct else None
            blocks = cfg.allocator in ("depth", "owl") or (cfg.allocator == "lsps" and cfg.sensitivity == "bi")
            scores = score_model(lm.adapter, scorer, batches, progress=progress, block_stats=blocks,
                                 keep_gradients=cfg.sensitivity == "fisher", compensation=means)
            sens = None
            if cfg.allocator == "lsps":
                sens = measure(cfg.sensitivity, lm.adapter, scores, probe, cfg.probe_ratio, cfg.attn_unit,
                               grads=getattr(scores, "gradients", None), progress=progress)
            if cache is not None and key is not None:
                cache[key] = (scores, sens, means)
        options = {}
        if cfg.allocator == "lsps":
            options = {"tau": cfg.tau, "min_ratio": min(cfg.min_module_ratio, round_ratio),
                       "max_ratio": max(cfg.max_module_ratio, round_ratio), "unit_cost": cfg.unit_cost}
        alloc = allocate(cfg.allocator, lm.adapter, round_ratio, scores=scores, sensitivities=sens,
                         attn_unit=cfg.attn_unit, round_to=cfg.round_to, **options)
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
        rc = cfg.recovery()
        windows = calibration_batches(lm.tokenizer, calib, rc.steps * rc.batch_size, cfg.seq_len, rc.seed)
        recovery = distill(lm.model, teacher, windows, rc, progress=progress)
        del teacher
    after = param_counts(lm.adapter)
    plan.meta.update({"scorer": scorer.describe(), "allocator": cfg.allocator, "ratio": cfg.ratio,
                      "rounds": cfg.rounds, "attn_unit": cfg.attn_unit, "round_to": cfg.round_to})
    return {
        "config": asdict(cfg),
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
