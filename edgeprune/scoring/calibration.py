"""Layer-by-layer calibration (as Wanda and FLAP do): capture the inputs of layer 0 once, then run one decoder
layer at a time on the calibration batches, so peak memory is one layer plus its activations, not the model's
whole activation graph. Hooks on the layer being run collect the statistics scorers need.

Statistics accumulate in float64 on the layer's device whatever the weights' dtype; a layer's inputs and outputs
stay in the working dtype."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from edgeprune.adapters.base import LayerAdapter, ModelAdapter, weight_source
from edgeprune.heap import trim_heap

ENERGY_CHUNK_BYTES = 8 * 2**20  # float64 per-head products of the head-energy statistics, per chunk of tokens


class _StopForward(Exception):
    pass


@dataclass
class FeatureStats:
    """Running first and second moments of one projection's input features over calibration tokens."""

    sum: torch.Tensor
    sumsq: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, dim: int, device=None) -> FeatureStats:
        return cls(torch.zeros(dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dtype=torch.float64, device=device))

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64, copy=True)  # a copy: squared in place below
        self.sum += x.sum(0)
        self.sumsq += x.square_().sum(0)
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sumsq / max(self.n, 1) - self.mean**2).clamp_min(0)

    @property
    def sq_mean(self) -> torch.Tensor:
        return self.sumsq / max(self.n, 1)


@dataclass
class LayerStats:
    """What one layer did on the calibration text."""

    attn_in: FeatureStats | None = None  # input of o_proj (concatenated head outputs)
    mlp_in: FeatureStats | None = None  # input of down_proj (intermediate activations)
    head_energy: torch.Tensor | None = None  # per query head: mean ||x_h W_o[:, h]^T||^2 per token
    group_energy: torch.Tensor | None = None  # per KV group: the same for the group's heads together
    attn_x: FeatureStats | None = None  # input of q/k/v (the normed residual stream)
    mlp_x: FeatureStats | None = None  # input of gate/up
    # Block Influence (ShortGPT): 1 - mean cos(input, output) of the layer / attention block / MLP block
    bi_layer: float = 0.0
    bi_attn: float = 0.0
    bi_mlp: float = 0.0
    extra: dict = field(default_factory=dict)


def capture_layer0_inputs(adapter: ModelAdapter, batches: torch.Tensor, micro_batch: int = 8):
    """Run the embeddings once; return per micro-batch (hidden_states, layer kwargs)."""
    from edgeprune.models.placement import input_device

    layer0 = adapter.layers[0].layer
    device = input_device(adapter.model)
    captured: list = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache")}
        kw["use_cache"] = False
        captured.append((hidden.detach(), kw))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in range(0, batches.shape[0], micro_batch):
                try:
                    adapter.model(input_ids=batches[b : b + micro_batch].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _bi(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]).double(),
                                                b.reshape(-1, b.shape[-1]).to(a.device).double(), dim=-1)
    return float((1 - cos).sum())


def collect_layer_stats(layer: LayerAdapter, inputs: list) -> tuple[LayerStats, list]:
    """Run one layer on every micro-batch with statistic hooks; return its stats and its outputs."""
    stats = LayerStats()
    handles = []
    head_dim = layer.head_dim
    dev = layer.attention_input_norm.weight.device  # accelerate never splits a decoder layer over devices
    bi = {"attn": 0.0, "mlp": 0.0}
    mid: list = []

    if layer.has_attention:
        o = layer.attention_projections().o
        stats.attn_in = FeatureStats.zeros(o.in_features, dev)
        n_heads, n_kv = layer.num_heads, layer.num_kv_heads
        stats.head_energy = torch.zeros(n_heads, dtype=torch.float64, device=dev)
        stats.group_energy = torch.zeros(n_kv, dtype=torch.float64, device=dev)
        w = o.weight.detach().view(o.out_features, n_heads, head_dim).float()  # float32 products for bf16 too

        # tokens per chunk of the per-head products: their float64 copy at most ENERGY_CHUNK_BYTES
        step = max(1, ENERGY_CHUNK_BYTES // (8 * n_heads * o.out_features))

        def attn_hook(_m, args):
            x = args[0]
            stats.attn_in.update(x)
            x = x.reshape(-1, n_heads, head_dim)
            for t in range(0, x.shape[0], step):
                xh = x[t:t + step].float()
                y = torch.einsum("thd,ohd->tho", xh, w)  # each head's contribution to the residual
                del xh
                yg = y.view(y.shape[0], n_kv, n_heads // n_kv, -1).sum(2)
                stats.head_energy.add_(y.double().square_().sum((0, 2)))  # the float32 y and one float64 copy
                del y
                stats.group_energy.add_(yg.double().square_().sum((0, 2)))
                del yg

        handles.append(o.register_forward_pre_hook(attn_hook))
    if layer.has_mlp:
        down = layer.mlp_projections().down
        stats.mlp_in = FeatureStats.zeros(down.in_features, dev)
        handles.append(down.register_forward_pre_hook(lambda _m, args: stats.mlp_in.update(args[0])))
    stats.attn_x = FeatureStats.zeros(layer.attention_input_norm.weight.shape[0], dev)
    stats.mlp_x = FeatureStats.zeros(layer.mlp_input_norm.weight.shape[0], dev)
    handles.append(layer.attention_input_norm.register_forward_hook(lambda _m, _a, y: stats.attn_x.update(y)))
    handles.append(layer.mlp_input_norm.register_forward_hook(lambda _m, _a, y: stats.mlp_x.update(y)))
    # the MLP-norm's input is the residual stream between the attention and the MLP block
    handles.append(layer.mlp_input_norm.register_forward_pre_hook(lambda _m, args: mid.append(args[0])))

    outputs = []
    n_tokens = 0
    try:
        with torch.no_grad():
            for hidden, kw in inputs:
                mid.clear()
                out = run_layer(layer.layer, hidden, kw)
                h_mid = mid[0] if mid else hidden
                bi["attn"] += _bi(hidden, h_mid)
                bi["mlp"] += _bi(h_mid, out)
                stats.bi_layer += _bi(hidden, out)
                n_tokens += hidden.shape[0] * hidden.shape[1]
                outputs.append((out, kw))
    finally:
        for h in handles:
            h.remove()
    if stats.head_energy is not None:
        stats.head_energy /= max(n_tokens, 1)
        stats.group_energy /= max(n_tokens, 1)
    stats.bi_layer /= max(n_tokens, 1)
    stats.bi_attn = float(bi["attn"]) / max(n_tokens, 1)
    stats.bi_mlp = float(bi["mlp"]) / max(n_tokens, 1)
    return stats, outputs


def layerwise(adapter: ModelAdapter, batches: torch.Tensor, micro_batch: int = 8,
              progress: bool = True) -> Iterator[tuple[LayerAdapter, LayerStats]]:
    """Yield (layer, stats) for every decoder layer, one layer in memory at a time."""
    from tqdm.auto import tqdm

    inputs = capture_layer0_inputs(adapter, batches, micro_batch)
    for layer in tqdm(adapter.layers, desc="calibration", unit="layer", disable=not progress, leave=False):
        stats, inputs = collect_layer_stats(layer, inputs)
        yield layer, stats


LOGIT_CHUNK_BYTES = 8 * 2**20  # float32 logits per lm_head product of a chunked next-token loss
# logit post-processing that ``head_logits`` does not reproduce: such models take the unchunked loss
_OTHER_HEADS = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for lm_head inputs ``hidden`` (after the final norm), in float32, computed as its
    forward computes them: lm_head, then final-logit softcapping where the config asks for it (Gemma), in the
    working dtype, then the float32 upcast the loss takes."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def _chunkable(model) -> bool:
    cfg = model.config
    return model.get_output_embeddings() is not None and not any(getattr(cfg, k, None) for k in _OTHER_HEADS)


def lm_head_inputs(model, ids: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``ids`` up to its lm_head and return the lm_head's input (the final-normed hidden states,
    with their autograd graph when gradients are on); the full-vocabulary logits are never formed."""
    captured = []

    def hook(_module, args):
        captured.append(args[0])
        raise _StopForward

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def chunked_next_token_loss(model, ids: torch.Tensor, n_total: int, chunk_bytes: int = LOGIT_CHUNK_BYTES) -> None:
    """Backpropagate the summed next-token cross-entropy of ``ids`` divided by ``n_total`` through ``model`` without forming
    the full-vocabulary logits: the body runs once up to lm_head's input, the loss is backpropagated to that
    input in chunks of positions (each chunk's float32 logits at most ``chunk_bytes``; a position's logits depend
    on that position only, so the chunks' gradients do not overlap), then once through the body. The same
    gradients as one ``cross_entropy`` over all logits, up to float rounding; one backward pass through the
    decoder layers (what post-accumulate-grad hooks see)."""
    hidden = lm_head_inputs(model, ids)
    if not hidden.requires_grad:
        raise RuntimeError("no parameter below lm_head requires a gradient")
    width = hidden.shape[-1]
    rows = hidden[:, :-1].detach().reshape(-1, width).requires_grad_(True)  # a leaf: chunks backprop to it
    targets = ids[:, 1:].reshape(-1)
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, chunk_bytes // (4 * vocab))
    for c in range(0, rows.shape[0], step):
        logits = head_logits(model, rows[c:c + step])
        loss = torch.nn.functional.cross_entropy(logits, targets[c:c + step].to(logits.device),
                                                 reduction="sum") / n_total
        del logits
        loss.backward()
        del loss
    grad = torch.zeros_like(hidden)
    grad[:, :-1] = rows.grad.view(hidden.shape[0], hidden.shape[1] - 1, width)
    del rows
    trim_heap()  # the chunks' freed logits, before the backward pass through the layers allocates its own
    hidden.backward(grad)


def backward_next_token_loss(model, batches: torch.Tensor, micro_batch: int = 4, progress: bool = True,
                             chunk_bytes: int | None = LOGIT_CHUNK_BYTES) -> int:
    """Backpropagate the mean next-token loss over all of ``batches``, one micro-batch's graph at a time (each
    backward pass adds its share to the gradients, or feeds post-accumulate-grad hooks). The logits are formed
    ``chunk_bytes`` of float32 at a time (``chunked_next_token_loss``; None: all of a micro-batch's at once, as
    do models whose logit post-processing ``head_logits`` does not know). Returns the number of backward passes."""
    from tqdm.auto import tqdm

    from edgeprune.models.placement import input_device

    device = input_device(model)
    n_total = batches[:, 1:].numel()
    chunked = chunk_bytes is not None and _chunkable(model)
    passes = 0
    for b in tqdm(range(0, batches.shape[0], micro_batch), desc="gradients", unit="batch",
                  disable=not progress, leave=False):
        ids = batches[b : b + micro_batch].to(device)
        if chunked:
            chunked_next_token_loss(model, ids, n_total, chunk_bytes)
        else:
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum") / n_total
            del logits
            loss.backward()
        passes += 1
    return passes


def accumulate_gradients(adapter: ModelAdapter, batches: torch.Tensor, micro_batch: int = 4,
                         progress: bool = True) -> dict[str, torch.Tensor]:
    """Sum of dL/dW over the calibration batches for every decoder-layer projection weight.

    Cost: one float32 gradient per decoder projection weight (the size of the decoder layers) plus the
    activations of one micro-batch; each micro-batch's graph is freed by its backward pass.
    """
    model = adapter.model
    params, rows = {}, {}  # unique parameters; role -> (parameter key, its rows) (fused roles share one)
    for layer in adapter.layers:
        mods = {}
        if layer.has_attention:
            mods.update(layer.attention_projections()._asdict())
        if layer.has_mlp:
            mods.update(layer.mlp_projections()._asdict())
        for name, mod in mods.items():
            param, sl = weight_source(mod)
            params.setdefault(id(param), param)
            rows[f"{layer.index}.{name}"] = (id(param), sl)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        backward_next_token_loss(model, batches, micro_batch, progress)
        grads = {k: params[pid].grad[sl].detach().clone() for k, (pid, sl) in rows.items()}
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(flags.get(id(p), True))
    return grads
