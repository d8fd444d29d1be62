"""Streamed scoring and pruning: the layer-by-layer passes run on a ``StreamedModel`` (edgeprune.streaming), so
the whole model is never resident. Peak memory: the embeddings, final norm and lm_head, one decoder layer (two
while surgery cuts it), the calibration activations of one layer (inputs and outputs), the statistics of one
layer, the logit-lens gradient of the layer's projections, and the temporaries of one pass: one window's layer
graph (``MICRO_BATCH``) and 4 MiB chunks of logit-lens logits (``lens_gradients``), 8 MiB chunks of per-head
products (``collect_layer_stats``), a few MiB of float64 terms of one projection at a time (the scorers' weight
terms, OWL's outlier ratios: ``scoring.base.row_chunks``), and o_proj's Gram matrix in the refit. The heap is
trimmed after every layer (edgeprune.heap.trim_heap).

- ``stream_score``: the activation statistics and Block Influence of ``collect_layer_stats`` layer by layer; the
  same scores as ``score_model`` for every scorer without a gradient term.
- The gradient (Taylor) term cannot come from a whole-model backward pass here. ``gradient`` chooses the
  layer-local substitute: ``"lens"`` differentiates the logit-lens loss of the layer (cross-entropy of the next
  tokens predicted from the layer's output through the final norm and lm_head; for the last layer this is the
  exact gradient), ``"none"`` leaves the term out (PIEM keeps its weight and contextual terms). The default is
  the measured choice (README "Streaming").
- ``stream_apply``: cuts a plan into each layer (optionally with the least-squares refit of reconstruct.py, run
  sequentially on the pruned layers' outputs as the in-memory refit is) and writes each pruned layer into its own
  safetensors shard of the output checkpoint right away.
- ``stream_prune``: rounds of score -> (Block Influence) sensitivity -> allocation -> plan -> pruned shards,
  each round streaming the previous round's output; writes a checkpoint that ``load`` and plain transformers read.

Not supported while streaming (``check_streamable``: one-line errors that name the option to change): the ``loss``
and ``fisher`` sensitivities (whole-model passes or gradients), distillation (``recover_steps``), which needs the
student resident, and devices other than the CPU. `edgeprune prune --stream` and the pipeline reach this module
through ``edgeprune.prune.prune_checkpoint``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from edgeprune.allocation.base import prunable_total
from edgeprune.config import STREAM_GRADIENTS, check_streamable, recipe_notes  # noqa: F401  (re-exported)
from edgeprune.errors import EdgePruneError
from edgeprune.plan import PruningPlan, compose
from edgeprune.reconstruct import reconstruct_layer
from edgeprune.scoring.calibration import capture_layer0_inputs, collect_layer_stats, run_layer
from edgeprune.streaming import LayerShardWriter, StreamedModel, layer_state, release, trim_heap, write_config
from edgeprune.surgery import cut_attention, cut_mlp, unit_dims

GRADIENTS = STREAM_GRADIENTS  # PruneConfig.stream_gradient
DEFAULT_GRADIENT = GRADIENTS[0]  # measured: bench/stream_gradient.py, README "Scale"
LENS_STRIDE = 8  # the logit-lens loss reads every 8th position (its lm_head products cost ~1/3 of a layer pass each)
LENS_CHUNK_BYTES = 4 * 2**20  # float32 logits per lm_head product of the logit-lens loss
# calibration windows per layer call in stream_prune: a layer's activations (and, in the logit-lens pass, its
# autograd graph) for one 128-token window instead of all of them; the statistics are the same sums (float64, in
# another order), the lens gradient the same sum over windows (float rounding)
MICRO_BATCH = 1


def _stream_scorer(scorer, gradient: str):
    if gradient not in GRADIENTS:
        raise EdgePruneError(f"unknown streamed gradient term '{gradient}'; choose from {', '.join(GRADIENTS)}")
    if not scorer.needs_gradients or gradient == "lens":
        return scorer
    from edgeprune.scoring.scorers import PIEMScorer

    if isinstance(scorer, PIEMScorer):
        return PIEMScorer(scorer.alpha, 0.0, scorer.gamma, scorer.context)
    raise EdgePruneError(f"the {scorer.name} scorer is all gradient: stream it with gradient='lens'")


def _projections(layer) -> dict[str, torch.nn.Linear]:
    out = {}
    if layer.has_attention:
        out.update(layer.attention_projections()._asdict())
    if layer.has_mlp:
        out.update(layer.mlp_projections()._asdict())
    return out


def lens_gradients(adapter, layer, inputs: list, batches: torch.Tensor, micro_batch: int,
                   stride: int = LENS_STRIDE, chunk_bytes: int = LENS_CHUNK_BYTES) -> dict:
    """Sum over the calibration batches of dL/dW for the layer's projections, L the logit-lens loss of the layer
    (mean next-token cross-entropy of lm_head(final_norm(layer output))) on every ``stride``-th position: the
    lm_head products dominate the cost, once per layer. Keys as ``accumulate_gradients``.

    Memory: the layer's graph for one micro-batch, and the float32 logits of at most ``chunk_bytes`` at a time:
    the loss is backpropagated to the picked layer outputs chunk of positions by chunk (each position's logits
    depend on that position only, so the chunks' gradients do not overlap), then once through the layer. Only the
    projection weights take gradients (the lm_head's is never formed)."""
    params = {f"{layer.index}.{k}": m.weight for k, m in _projections(layer).items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    n_total = batches[:, 1::stride].numel()
    try:
        with torch.enable_grad():
            for j, (hidden, kw) in enumerate(inputs):
                ids = batches[j * micro_batch:(j + 1) * micro_batch]
                out = run_layer(layer.layer, hidden, kw)
                picked = out[:, :-1][:, ::stride]
                leaf = picked.detach().requires_grad_(True)
                rows, targets = leaf.reshape(-1, leaf.size(-1)), ids[:, 1::stride].reshape(-1)
                vocab = adapter.lm_head.weight.shape[0]
                step = max(1, chunk_bytes // (4 * vocab))
                for c in range(0, rows.shape[0], step):
                    logits = adapter.lm_head(adapter.final_norm(rows[c:c + step])).float()
                    loss = torch.nn.functional.cross_entropy(logits, targets[c:c + step], reduction="sum") / n_total
                    loss.backward()
                    del logits, loss
                picked.backward(leaf.grad)
                del out, picked, leaf, rows
        return {k: p.grad.detach() for k, p in params.items()}
    finally:
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)


def stream_score(sm: StreamedModel, scorer, batches: torch.Tensor, micro_batch: int = 8,
                 gradient: str = DEFAULT_GRADIENT, block_stats: bool = False, compensation: dict | None = None,
                 progress: bool = True):
    """Score every unit of a streamed model (see the module docstring). Returns ``UnitScores``."""
    from tqdm.auto import tqdm

    from edgeprune.scoring.base import UnitScores, block_scores, outlier_ratio

    start = time.perf_counter()
    scorer = _stream_scorer(scorer, gradient)
    need_stats = scorer.needs_activations or block_stats or compensation is not None
    need_run = need_stats or scorer.needs_gradients
    inputs = capture_layer0_inputs(sm.adapter, batches, micro_batch) if need_run else None
    layers = []
    for index in tqdm(range(len(sm.adapter.layers)), desc="streamed scoring", unit="layer",
                      disable=not progress, leave=False):
        with sm.layer(index) as layer:
            grads = None
            if scorer.needs_gradients:
                grads = lens_gradients(sm.adapter, layer, inputs, batches, micro_batch)
                trim_heap()  # the backward pass's temporaries, before the statistics pass allocates its own
            stats = None
            if need_run:
                stats, inputs = collect_layer_stats(layer, inputs)
                trim_heap()  # the statistics pass's temporaries, before the scorer's
            with torch.no_grad():
                s = scorer.score_layer(layer, stats if need_stats else None, grads)
                trim_heap()  # the scorer's float64 chunks, before the outlier ratio's
                if need_stats:
                    s.blocks = block_scores(stats)
                    s.blocks["outliers"] = outlier_ratio(layer, stats)
            if compensation is not None:
                compensation[layer.index] = {
                    "attention": stats.attn_in.mean.float() if stats.attn_in is not None else None,
                    "mlp": stats.mlp_in.mean.float() if stats.mlp_in is not None else None}
        layers.append(s)
    meta = {"scorer": scorer.describe(), "seconds": time.perf_counter() - start,
            "calibration_shape": list(batches.shape), "streamed": True, "gradient": gradient}
    return UnitScores(scorer.name, layers, meta)


def _compensation(layer, lp, means: dict) -> tuple:
    """prune.compensation_biases for one layer: the removed units' mean contribution."""
    attn = mlp = None
    if layer.has_attention and means.get("attention") is not None and len(lp.heads) < layer.num_heads:
        o = layer.attention_projections().o
        gone = unit_dims([h for h in range(layer.num_heads) if h not in set(lp.heads)], layer.head_dim)
        attn = o.weight[:, gone] @ means["attention"][gone].to(o.weight.dtype)
    if layer.has_mlp and means.get("mlp") is not None and len(lp.channels) < layer.intermediate_size:
        down = layer.mlp_projections().down
        keep = set(lp.channels)
        gone = torch.tensor([c for c in range(layer.intermediate_size) if c not in keep], dtype=torch.long)
        mlp = down.weight[:, gone] @ means["mlp"][gone].to(down.weight.dtype)
    return attn, mlp


def stream_apply(sm: StreamedModel, plan: PruningPlan, out: Path, batches: torch.Tensor | None = None,
                 reconstruct: bool = False, damp: float = 1e-3, means: dict | None = None, micro_batch: int = 8,
                 progress: bool = True) -> str:
    """Cut ``plan`` into the streamed model layer by layer and write the result to the (existing, empty)
    directory ``out`` as a sharded safetensors checkpoint with its config. Returns the config layout."""
    from tqdm.auto import tqdm

    plan.validate(sm.adapter)
    if reconstruct and batches is None:
        raise ValueError("the refit needs calibration batches")
    layers = sm.adapter.layers
    list_prefix = sm.prefix(layers[0].layer).rstrip(".").rsplit(".", 1)[0]  # "model.layers"
    writer = LayerShardWriter(out, sum(not lp.drop for lp in plan.layers) + 1)
    inputs = capture_layer0_inputs(sm.adapter, batches, micro_batch) if reconstruct else None
    new_index = 0
    for lp in tqdm(plan.layers, desc="streamed surgery", unit="layer", disable=not progress, leave=False):
        if lp.drop:
            continue
        with sm.layer(lp.index) as layer, torch.no_grad():
            if reconstruct:
                reconstruct_layer(layer, lp, inputs, damp)
                inputs = [(run_layer(layer.layer, hidden, kw), kw) for hidden, kw in inputs]
            else:
                attn, mlp = _compensation(layer, lp, (means or {}).get(lp.index, {}))
                cut_attention(layer, lp, attn)
                cut_mlp(layer, lp, mlp)
            writer.add(layer_state(layer.layer, f"{list_prefix}.{new_index}."))
        new_index += 1
    drops = [lp.index for lp in plan.layers if lp.drop]
    if drops:
        sm.adapter.drop_layers(drops)
    params = dict(sm.model.named_parameters(remove_duplicate=False))
    writer.add({name: params[name] for name in sm.resident_names()})
    writer.finish()
    return write_config(sm, out)


def layer_summary(path) -> dict:
    """Per-layer shapes and parameter counts of a safetensors model directory, from its config alone (the model
    built on ``meta``: no weight is read)."""
    from edgeprune.adapters import get_adapter
    from edgeprune.models.info import layer_param_counts
    from edgeprune.streaming import skeleton

    adapter = get_adapter(skeleton(Path(path)))
    return {"shapes": [s.to_dict() for s in adapter.shapes()],
            "layer_params": [layer_param_counts(layer) for layer in adapter.layers]}


def stream_prune(spec: str, cfg, calib, out_dir, dtype: str = "float32", gradient: str | None = None,
                 progress: bool = True) -> dict:
    """``prune_model`` + ``save_checkpoint`` for a model that need not fit in memory: every round streams the
    previous round's checkpoint and writes the next. ``gradient``: the streamed gradient term (None: the config's
    ``stream_gradient``). Returns the record (also in the output's manifest, as `edgeprune prune` writes it)."""
    import resource
    from dataclasses import replace

    from edgeprune.allocation import ALLOCATORS
    from edgeprune.data import calibration_batches
    from edgeprune.io import MANIFEST, atomic_dir, manifest, write_json
    from edgeprune.models.info import param_counts
    from edgeprune.scoring import make_scorer
    from edgeprune.selection import build_plan
    from edgeprune.sensitivity import measure
    from edgeprune.streaming import source_dir

    cfg = replace(cfg, stream=True, stream_gradient=gradient or cfg.stream_gradient)
    gradient = cfg.stream_gradient
    cfg.validate()  # includes check_streamable
    src = source_dir(spec)
    scorer = make_scorer(cfg.scorer, seed=cfg.seed, **cfg.scorer_kwargs())
    start = time.perf_counter()
    with atomic_dir(Path(out_dir)) as tmp, tempfile.TemporaryDirectory(dir=Path(tmp).parent) as work:
        sm = StreamedModel(src, dtype)
        tokenizer = sm.tokenizer()
        batches = calibration_batches(tokenizer, calib, cfg.n_samples, cfg.seq_len, cfg.seed)
        before = param_counts(sm.adapter)
        base = prunable_total(sm.adapter, cfg.unit_cost)
        plan, rounds = PruningPlan.identity(sm.adapter), []
        for r in range(1, cfg.rounds + 1):
            now = prunable_total(sm.adapter, cfg.unit_cost)
            round_ratio = min(max(0.0, (cfg.ratio * base * r / cfg.rounds - (base - now)) / now), 0.999)
            means = {} if cfg.bias_compensation and not cfg.reconstruct else None
            blocks = cfg.allocator in ("depth", "owl") or cfg.allocator == "lsps"
            scores = stream_score(sm, scorer, batches, micro_batch=MICRO_BATCH, gradient=gradient,
                                  block_stats=blocks, compensation=means, progress=progress)
            sens = measure("bi", sm.adapter, scores, batches) if cfg.allocator == "lsps" else None
            alloc = ALLOCATORS[cfg.allocator].from_config(cfg, round_ratio).allocate(
                sm.adapter, round_ratio, scores=scores, sensitivities=sens, attn_unit=cfg.attn_unit,
                round_to=cfg.round_to)
            step = build_plan(sm.adapter, scores, alloc)
            dest = Path(tmp) if r == cfg.rounds else Path(work) / f"round{r}"
            dest.mkdir(exist_ok=True)
            layout = stream_apply(sm, step, dest, batches, reconstruct=cfg.reconstruct, damp=cfg.damp,
                                  means=means, micro_batch=MICRO_BATCH, progress=progress)
            plan = compose(plan, step)
            rounds.append({"round": r, "ratio_of_current": round_ratio, "allocation": alloc.to_dict(),
                           "sensitivity": [s.to_dict() for s in sens] if sens else None,
                           "block_influence": [s.blocks for s in scores.layers],
                           "scoring_seconds": scores.meta["seconds"]})
            shapes = [s.to_dict() for s in sm.adapter.shapes()]
            after = param_counts(sm.adapter)
            if r < cfg.rounds:
                sm = StreamedModel(dest, dtype)
        plan.meta.update({"scorer": scorer.describe(), "allocator": cfg.allocator, "ratio": cfg.ratio,
                          "rounds": cfg.rounds, "attn_unit": cfg.attn_unit, "round_to": cfg.round_to,
                          "streamed": {"dtype": dtype, "gradient": gradient}})
        record = {
            "config": asdict(cfg),
            "notes": recipe_notes(sm.adapter, cfg),
            "calibration": {"text": calib.name, "sha256": calib.sha256, "n_samples": cfg.n_samples,
                            "seq_len": cfg.seq_len, "seed": cfg.seed},
            "plan": plan.to_dict(), "layer_shapes": shapes, "rounds": rounds, "recovery": None,
            "params_before": before, "params_after": after,
            "decoder_reduction": 1 - after["decoder_layers"] / before["decoder_layers"],
            "total_reduction": 1 - after["total"] / before["total"],
            "seconds": time.perf_counter() - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        tokenizer.save_pretrained(tmp)
        gen = src / "generation_config.json"
        if gen.is_file():
            (Path(tmp) / gen.name).write_text(gen.read_text())
        write_json(Path(tmp) / MANIFEST, manifest("pruned-checkpoint", layout=layout, source_model=spec,
                                                  source=str(src), **record))
    release(sm.model)
    return record
