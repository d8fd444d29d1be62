"""Prune a loaded model: score -> allocate -> select -> surgery, in one or several rounds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgeprune.allocation import allocate
from edgeprune.allocation.base import check_ratio
from edgeprune.data import Text, calibration_batches
from edgeprune.models.info import param_counts
from edgeprune.plan import PruningPlan, compose
from edgeprune.scoring import make_scorer, score_model
from edgeprune.selection import build_plan
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


def prune_model(lm, cfg: PruneConfig, calib: Text, progress: bool = True) -> dict:
    """Prune ``lm`` in place. Returns a JSON-ready record (plan in original indices, params, timings)."""
    import resource

    check_ratio(cfg.ratio)
    scorer = make_scorer(cfg.scorer, seed=cfg.seed, **cfg.scorer_options)
    batches = calibration_batches(lm.tokenizer, calib, cfg.n_samples, cfg.seq_len, cfg.seed)
    before = param_counts(lm.adapter)
    base_decoder = before["decoder_layers"]
    plan = PruningPlan.identity(lm.adapter)
    rounds = []
    start = time.perf_counter()
    for r in range(1, cfg.rounds + 1):
        # each round removes its share of the *original* decoder parameters, measured on the current model
        target_removed = cfg.ratio * base_decoder * r / cfg.rounds
        now = param_counts(lm.adapter)["decoder_layers"]
        round_ratio = max(0.0, (target_removed - (base_decoder - now)) / now)
        scores = score_model(lm.adapter, scorer, batches, progress=progress)
        alloc = allocate(cfg.allocator, lm.adapter, min(round_ratio, 0.999), attn_unit=cfg.attn_unit,
                         round_to=cfg.round_to)
        step = build_plan(lm.adapter, scores, alloc)
        apply_plan(lm.adapter, step)
        plan = compose(plan, step)
        rounds.append({"round": r, "ratio_of_current": round_ratio, "allocation": alloc.to_dict(),
                       "scoring_seconds": scores.meta["seconds"]})
    after = param_counts(lm.adapter)
    plan.meta.update({"scorer": scorer.describe(), "allocator": cfg.allocator, "ratio": cfg.ratio,
                      "rounds": cfg.rounds, "attn_unit": cfg.attn_unit, "round_to": cfg.round_to})
    return {
        "config": cfg.__dict__,
        "calibration": {"text": calib.name, "sha256": calib.sha256, "n_samples": cfg.n_samples,
                        "seq_len": cfg.seq_len, "seed": cfg.seed},
        "plan": plan.to_dict(),
        "rounds": rounds,
        "params_before": before,
        "params_after": after,
        "decoder_reduction": 1 - after["decoder_layers"] / before["decoder_layers"],
        "total_reduction": 1 - after["total"] / before["total"],
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
