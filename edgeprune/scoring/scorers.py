"""The pluggable scorers: magnitude, taylor, wanda-sp, fluctuation, random and PIEM."""

from __future__ import annotations

import torch

from edgeprune.scoring.base import (
    LayerUnitScores,
    Scorer,
    block_scores,
    column_sums,
    normalise,
    reduce_features,
    reduce_per_projection,
)


def _f64(weight: torch.Tensor) -> torch.Tensor:
    """A float64 copy of a weight (always a copy: callers work on it in place)."""
    return weight.detach().to(torch.float64, copy=True)


def _col_norm_sq(layer):
    """||W[:, j]||^2 of o_proj and down_proj: how strongly input feature j writes into the residual stream
    (float64, summed over chunks of rows)."""
    def sq(w):
        return _f64(w).square_()

    o = column_sums(layer.attention_projections().o.weight, sq) if layer.has_attention else None
    down = column_sums(layer.mlp_projections().down.weight, sq) if layer.has_mlp else None
    return o, down


class MagnitudeScorer(Scorer):
    """L2 norm of all weights coupled to the unit (q/k/v rows and o columns; gate/up rows and down column)."""

    name = "magnitude"

    def score_layer(self, layer, stats, grads):
        g, h, c = reduce_per_projection(layer, lambda _r, lin, rows: _f64(lin.weight[rows]).square_())
        def sqrt(t):
            return (None if t is None else t.sqrt())
        return LayerUnitScores(sqrt(g), sqrt(h), sqrt(c), block_scores(stats))


class TaylorScorer(Scorer):
    """First-order Taylor (LLM-Pruner, element-wise): sum over the unit's weights of |w * dL/dw|."""

    name = "taylor"
    needs_gradients = True

    def score_layer(self, layer, stats, grads):
        if hasattr(grads, "layer_scores"):  # per-unit sums folded during the backward pass (scoring.gradients)
            return grads.layer_scores(layer, block_scores(stats))
        g, h, c = reduce_per_projection(
            layer, lambda r, lin, rows: _f64(lin.weight[rows]).mul_(grads[f"{layer.index}.{r}"][rows].double()).abs_())
        return LayerUnitScores(g, h, c, block_scores(stats))


class WandaSPScorer(Scorer):
    """Structured Wanda: for input feature j of o_proj / down_proj, sum_i |W_ij| * ||X_j||_2."""

    name = "wanda-sp"
    needs_activations = True

    def score_layer(self, layer, stats, grads):
        attn = mlp = None
        if layer.has_attention:
            o = layer.attention_projections().o.weight
            attn = column_sums(o, lambda w: _f64(w).abs_()) * stats.attn_in.sumsq.sqrt()
        if layer.has_mlp:
            down = layer.mlp_projections().down.weight
            mlp = column_sums(down, lambda w: _f64(w).abs_()) * stats.mlp_in.sumsq.sqrt()
        return LayerUnitScores(*reduce_features(layer, attn, mlp), block_scores(stats))


class FluctuationScorer(Scorer):
    """FLAP: the input feature's variance over calibration tokens times ||W[:, j]||^2 (the part of the unit's
    output that a bias cannot restore)."""

    name = "fluctuation"
    needs_activations = True

    def score_layer(self, layer, stats, grads):
        o_sq, d_sq = _col_norm_sq(layer)
        attn = stats.attn_in.var * o_sq if layer.has_attention else None
        mlp = stats.mlp_in.var * d_sq if layer.has_mlp else None
        return LayerUnitScores(*reduce_features(layer, attn, mlp), block_scores(stats))


class RandomScorer(Scorer):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score_layer(self, layer, stats, grads):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layer.index)
        def rnd(n):
            return (torch.rand(n, generator=gen, dtype=torch.float64) if n else None)
        return LayerUnitScores(rnd(layer.num_kv_heads), rnd(layer.num_heads), rnd(layer.intermediate_size),
                               block_scores(stats))

    def describe(self):
        return {"name": self.name, "seed": self.seed}


class PIEMScorer(Scorer):
    """PIEM, the paper's multi-dimensional importance: a weighted sum of three terms, each scaled to mean 1
    over the layer's units of one kind (groups, heads or channels) before combining:

    - weight term W(u): L2 norm of the unit's coupled weights (magnitude);
    - gradient term G(u): sum over the unit's weights of |w * dL/dw| on calibration text (first-order Taylor);
    - contextual term C(u): the unit's contribution to the layer's output on calibration text, i.e. the mean
      squared norm of what the unit writes into the residual stream: for a head or KV group the exact
      ||sum_{h in u} x_h W_o[:, h]^T||^2 per token, for an MLP channel E[x_j^2] * ||W_down[:, j]||^2. With
      ``context="fluctuation"`` the mean part is left out (E[(x_j - mean_j)^2]), for use with bias compensation.

    S(u) = alpha * W(u) + beta * G(u) + gamma * C(u).
    """

    name = "piem"
    needs_activations = True
    needs_gradients = True

    def __init__(self, alpha: float = 0.1, beta: float = 0.1, gamma: float = 0.8, context: str = "energy"):
        if min(alpha, beta, gamma) < 0 or alpha + beta + gamma <= 0:
            from edgeprune.errors import EdgePruneError

            raise EdgePruneError("PIEM weights must be >= 0 and not all zero")
        self.alpha, self.beta, self.gamma, self.context = alpha, beta, gamma, context
        self.needs_gradients = beta > 0
        self.needs_activations = gamma > 0

    def describe(self):
        return {"name": self.name, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "context": self.context}

    def terms(self, layer, stats, grads) -> dict[str, LayerUnitScores]:
        out = {"weight": MagnitudeScorer().score_layer(layer, stats, grads)}
        if self.beta > 0:
            out["gradient"] = TaylorScorer().score_layer(layer, stats, grads)
        if self.gamma > 0:
            out["context"] = self._context(layer, stats)
        return out

    def _context(self, layer, stats) -> LayerUnitScores:
        if self.context == "fluctuation":
            return FluctuationScorer().score_layer(layer, stats, None)
        o_sq, d_sq = _col_norm_sq(layer)
        groups = heads = channels = None
        if layer.has_attention:
            groups, heads = stats.group_energy, stats.head_energy
        if layer.has_mlp:
            channels = stats.mlp_in.sq_mean * d_sq
        return LayerUnitScores(groups, heads, channels, block_scores(stats))

    def score_layer(self, layer, stats, grads):
        weights = {"weight": self.alpha, "gradient": self.beta, "context": self.gamma}
        return combine_terms(self.terms(layer, stats, grads), weights, block_scores(stats))


def combine_terms(terms: dict[str, LayerUnitScores], weights: dict[str, float], blocks=None) -> LayerUnitScores:
    """PIEM's combination: sum of weight * term, each term scaled to mean 1 over the layer's units of a kind."""

    def combine(kind):
        parts = [weights[k] * normalise(getattr(t, kind)) for k, t in terms.items()
                 if weights.get(k, 0) > 0 and getattr(t, kind) is not None]
        return sum(parts) if parts else None

    return LayerUnitScores(combine("groups"), combine("heads"), combine("channels"), blocks or {})


SCORERS = {cls.name: cls for cls in (MagnitudeScorer, TaylorScorer, WandaSPScorer, FluctuationScorer,
                                      RandomScorer, PIEMScorer)}
