"""PIEM and baseline scorers, and the driver that runs a scorer over a model on calibration text."""

from __future__ import annotations

import time

from edgeprune.errors import EdgePruneError


def scorer_names() -> tuple[str, ...]:
    return ("magnitude", "taylor", "wanda-sp", "fluctuation", "random", "piem")


def make_scorer(name: str, seed: int = 0, **options):
    from edgeprune.scoring.scorers import SCORERS, RandomScorer

    if name not in SCORERS:
        raise EdgePruneError(f"unknown scorer '{name}'; choose from {', '.join(scorer_names())}")
    if name == "random":
        return RandomScorer(seed)
    return SCORERS[name](**options) if options else SCORERS[name]()


def score_model(adapter, scorer, batches, micro_batch: int = 8, progress: bool = True,
                keep_gradients: bool = False, compensation: dict | None = None, block_stats: bool = False):
    """Score every unit of every layer. The gradient term (if needed) comes from whole-model backward passes
    that fold each gradient into per-unit sums as it is produced (scoring.gradients: no full-size gradient is
    kept, decoder layers are checkpointed); activation statistics from a layer-by-layer pass, which also runs
    for a weight-only scorer when ``block_stats`` asks for the block statistics (Block Influence, outlier
    ratios) that the bi sensitivity and the depth and owl allocators read. ``keep_gradients`` keeps those
    per-unit sums (for the fisher sensitivity)."""
    import torch

    from edgeprune.heap import trim_heap
    from edgeprune.scoring.base import UnitScores, outlier_ratio
    from edgeprune.scoring.calibration import layerwise
    from edgeprune.scoring.gradients import unit_taylor

    start = time.perf_counter()
    grads = None
    if scorer.needs_gradients:
        grads = unit_taylor(adapter, batches, micro_batch=max(1, micro_batch // 2), progress=progress)
        trim_heap()  # the backward passes' temporaries, before the statistics pass allocates its own
    layers = []
    with torch.no_grad():
        if scorer.needs_activations or block_stats or compensation is not None:
            for layer, stats in layerwise(adapter, batches, micro_batch=micro_batch, progress=progress):
                s = scorer.score_layer(layer, stats, grads)
                s.blocks["outliers"] = outlier_ratio(layer, stats)
                if compensation is not None:  # mean inputs of o_proj/down_proj, for bias compensation
                    compensation[layer.index] = {
                        "attention": stats.attn_in.mean.float().cpu() if stats.attn_in is not None else None,
                        "mlp": stats.mlp_in.mean.float().cpu() if stats.mlp_in is not None else None}
                layers.append(_on_cpu(s))
                trim_heap()
        else:
            for layer in adapter.layers:
                layers.append(_on_cpu(scorer.score_layer(layer, None, grads)))
    meta = {"scorer": scorer.describe(), "seconds": time.perf_counter() - start,
            "calibration_shape": list(batches.shape)}
    scores = UnitScores(scorer.name, layers, meta)
    if keep_gradients:
        scores.gradients = grads  # not serialised; for the fisher sensitivity
    return scores


def _on_cpu(s):
    """Unit scores leave the layer's device as float64 CPU tensors (allocation and plans work on the CPU)."""
    import torch

    def cpu(t):
        return None if t is None else t.detach().to("cpu", torch.float64)

    s.groups, s.heads, s.channels = cpu(s.groups), cpu(s.heads), cpu(s.channels)
    s.blocks = {k: float(v) for k, v in s.blocks.items()}
    return s
