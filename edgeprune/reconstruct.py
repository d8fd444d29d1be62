"""Least-squares reconstruction: cut a PruningPlan into the model layer by layer and refit each pruned block's
output projection (o_proj, down_proj) on calibration text, without retraining.

Removing input features j of an output projection W (out x d) changes the block's output by W[:, removed] x_removed.
The kept columns and a bias can absorb much of that, because the removed features are correlated with the kept
ones: with X the projection's inputs on calibration tokens (one row per token, a column of ones appended for the
bias) and G = X^T X, the least-squares refit of the kept columns K is

    [W_K' b'] = [W b] G[:, K] (G[K, K] + lambda I)^-1,

the exact minimiser of ||X [W b]^T - X_K [W_K' b']^T||^2 plus a ridge term (lambda = ``damp`` x the mean
diagonal of G[K, K], as SparseGPT dampens its Hessian). FLAP's bias compensation is the special case that refits
the bias alone. Removing a whole block keeps its mean output as a bias.

The pass is sequential, as SparseGPT's and Wanda's are: layer i is refit on the inputs the already pruned layers
0..i-1 produce, so each refit also corrects the error arriving from below. Within a layer the attention block is
cut first and the MLP block is refit on the inputs the pruned attention produces. Memory: one layer, its
calibration activations and the Gram matrix (d+1)^2 in float64 of a refit projection's inputs (o_proj's; the
down_proj bias refit needs only its inputs' mean, so its much wider Gram is formed only with ``mlp_weights``).
"""

from __future__ import annotations

import torch

from edgeprune.heap import release_file_pages, storage_ranges, trim_heap
from edgeprune.plan import PruningPlan
from edgeprune.scoring.calibration import capture_layer0_inputs, run_layer
from edgeprune.surgery import cut_attention, cut_mlp, drop_layers, unit_dims


class _Gram:
    """X^T X of a projection's inputs with a column of ones appended."""

    def __init__(self, dim: int, device=None):
        self.g = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # float64 whatever the working dtype
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], 1)
        self.g += x.T @ x


def _watch_input(layer_module, proj: torch.nn.Linear, inputs: list, update) -> None:
    """Run the layer on every calibration input with ``update(x)`` seeing what ``proj`` receives."""
    handle = proj.register_forward_pre_hook(lambda _m, args: update(args[0]))
    try:
        with torch.no_grad():
            for hidden, kw in inputs:
                run_layer(layer_module, hidden, kw)
    finally:
        handle.remove()


def gram_of_input(layer_module, proj: torch.nn.Linear, inputs: list) -> torch.Tensor:
    gram = _Gram(proj.in_features, proj.weight.device)
    _watch_input(layer_module, proj, inputs, gram.update)
    return gram.g


def refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, keep: torch.Tensor,
          damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """New (weight over the kept columns, bias) minimising the output error on the Gram's tokens."""
    d = weight.shape[1]
    k = torch.cat([keep.long(), torch.tensor([d])]).to(gram.device)  # kept columns plus the ones column (the bias)
    # float64 temporaries of ~(d+1)^2 each (33 MiB at d = 2048): at most four alive at once
    gk = gram.index_select(1, k)  # (d+1, |k|)
    rhs = weight.double() @ gk[:d]  # [W b] @ G[:, k], the bias row added below: (out, |k|)
    if bias is not None:
        rhs += bias.double()[:, None] * gk[d][None, :]
    gkk = gk.index_select(0, k)
    del gk
    diag = gkk.diagonal()
    lam = damp * diag[:-1].mean() if len(k) > 1 else 0.0
    diag[:-1] += lam + 1e-10
    new = torch.linalg.solve(gkk, rhs.T).T  # gkk is symmetric positive definite
    del gkk, rhs
    return new[:, :-1].to(weight.dtype), new[:, -1].to(weight.dtype)


def set_linear(lin: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    lin.weight.data.copy_(weight)
    if lin.bias is None:
        lin.bias = torch.nn.Parameter(bias.clone())
    else:
        lin.bias.data.copy_(bias)


def mean_of_input(layer_module, proj: torch.nn.Linear, inputs: list) -> torch.Tensor:
    """The mean of a projection's inputs over the calibration tokens (float64): what ``bias_only`` needs, without
    the (d+1)^2 Gram matrix (189 MiB for a 4,864-wide MLP)."""
    total = torch.zeros(proj.in_features, dtype=torch.float64, device=proj.weight.device)
    count = [0]

    def update(x):
        x = x.reshape(-1, x.shape[-1])
        total.add_(x.sum(0, dtype=torch.float64))
        count[0] += x.shape[0]

    _watch_input(layer_module, proj, inputs, update)
    return total / max(count[0], 1)


def bias_only(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
              keep: torch.Tensor) -> torch.Tensor:
    """The bias that keeps the block's mean output (FLAP's compensation): b + W[:, removed] E[x_removed], with
    ``mean`` the inputs' mean (``mean_of_input``; or a Gram's ones column over its token count)."""
    d = weight.shape[1]
    gone = torch.ones(d, dtype=torch.bool, device=weight.device)
    gone[keep] = False
    extra = weight.double()[:, gone] @ mean[gone]
    return (extra if bias is None else bias.double() + extra).to(weight.dtype)


def reconstruct_layer(layer, lp, inputs: list, damp: float = 1e-3, mlp_weights: bool = False) -> None:
    """One layer of ``apply_plan_reconstruct``: cut the plan in, refitting o_proj (and down_proj's bias,
    or its kept columns too with ``mlp_weights``) by least squares on ``inputs``."""
    if layer.has_attention and len(lp.heads) < layer.num_heads:
        o = layer.attention_projections().o
        gram = gram_of_input(layer.layer, o, inputs)
        w, b = refit(o.weight.data, o.bias.data if o.bias is not None else None, gram,
                     unit_dims(lp.heads, layer.head_dim), damp)
        cut_attention(layer, lp, b)
        if lp.kv_heads:
            set_linear(layer.attention_projections().o, w, b)
    if layer.has_mlp and len(lp.channels) < layer.intermediate_size:
        down = layer.mlp_projections().down
        keep = torch.tensor(lp.channels, dtype=torch.long)
        b0 = down.bias.data if down.bias is not None else None
        if mlp_weights:
            w, b = refit(down.weight.data, b0, gram_of_input(layer.layer, down, inputs), keep, damp)
        else:  # the bias alone needs the inputs' mean, not their Gram matrix
            w, b = down.weight.data[:, keep], bias_only(down.weight.data, b0, mean_of_input(layer.layer, down, inputs),
                                                        keep)
        cut_mlp(layer, lp, b)
        if lp.channels:
            set_linear(layer.mlp_projections().down, w, b)


def apply_plan_reconstruct(adapter, plan: PruningPlan, batches: torch.Tensor, micro_batch: int = 8,
                           damp: float = 1e-3, mlp_weights: bool = False, progress: bool = True) -> dict:
    """Prune ``adapter.model`` in place by ``plan``, refitting the output projection of every pruned block.

    ``mlp_weights``: also refit down_proj's kept columns by least squares; by default only its bias is refit.
    Measured on SmolLM2-135M with 8,192 calibration tokens: refitting o_proj cuts the held-out output error of
    a pruned attention block by 2-3x, while refitting down_proj (1,537 unknowns per row) overfits and raises
    it; see README.md "Reconstruction". Returns what was refit, for the record."""
    from tqdm.auto import tqdm

    plan.validate(adapter)
    inputs = capture_layer0_inputs(adapter, batches, micro_batch)
    record = []
    for layer, lp in tqdm(list(zip(adapter.layers, plan.layers, strict=True)), desc="reconstruct", unit="layer",
                          disable=not progress, leave=False):
        if lp.drop:  # a dropped layer passes its input through
            continue
        old = storage_ranges(layer.layer)
        reconstruct_layer(layer, lp, inputs, damp, mlp_weights)
        with torch.no_grad():
            inputs = [(run_layer(layer.layer, hidden, kw), kw) for hidden, kw in inputs]
        record.append(lp.index)
        release_file_pages(old, storage_ranges(adapter.model))  # the cut weights' mapped checkpoint pages
        trim_heap()  # the refit's Gram matrices and the cut weights' old storage
    drop_layers(adapter, [lp.index for lp in plan.layers if lp.drop])
    adapter.sync_config()
    return {"refit_layers": record, "damp": damp}
