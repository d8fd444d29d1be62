"""Which stages a run has: validate the whole configuration, resolve texts and hash the model and task files
(cheap: no model is loaded), then build the stage list, every stage for the unpruned baseline and the pruned
model where it applies::

    eval-baseline                         PyTorch PPL (+ zero-shot) of the unpruned model
    fit                                   with a [fit] target: choose the ratio and dtype, prune, measure
    prune                                 PIEM scoring -> LSPS allocation -> surgery -> checkpoint (with [fit]:
                                          the checkpoint fit chose)
    eval-pruned                           the same evaluation of the pruned checkpoint
    export-{baseline,pruned}-FMT-DTYPE    ONNX / GGUF artifacts (INT8 included) with their parity checks
    ppl-{baseline,pruned}-FMT-DTYPE       PPL of each artifact in its own runtime (onnxruntime, llama.cpp)
    profile-{baseline,pruned}-FMT-DTYPE   TTFT, decode tokens/s and peak RSS on the chosen device (here or
                                          over SSH; keyed by the measuring machine's identity)
    report                                report.json, report.md and a self-contained report.html

Not here: running them (engine.py) or what each does (stages.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgeprune.data import resolve_text
from edgeprune.errors import EdgePruneError
from edgeprune.io import check_writable_parent, sha256_file
from edgeprune.pipeline.config import RunConfig
from edgeprune.pipeline.engine import Stage
from edgeprune.pipeline.fingerprint import Fingerprints, task_hashes
from edgeprune.pipeline.profiling import Target
from edgeprune.pipeline.stages import (
    ArtifactPPLStage,
    Context,
    EvalStage,
    ExportStage,
    ProfileStage,
    PruneStage,
    ReportStage,
)
from edgeprune.rundir import VARIANTS


def _ablation_source(cfg: RunConfig) -> Path | None:
    """The ablation table of the run's model: ``report.ablation`` when it was measured on that model (its "model"
    field; files without one are the default model's), else ``ablation-MODEL.json`` beside it (bench/ablate.py's
    name for another model's grid), else none, so a Gemma run never shows SmolLM2's table."""
    if not cfg.report.ablation:
        return None
    p = Path(cfg.report.ablation).expanduser()
    model = cfg.run.model
    named = [p.with_name(f"ablation-{model}.json")] if model and "/" not in model and "\\" not in model else []
    for path in (p, *named):
        try:
            if json.loads(path.read_text()).get("model", "default") == model:
                return path
        except (OSError, ValueError):  # absent, unreadable or not JSON: no table from it
            continue
    return None


def _tasks(cfg: RunConfig) -> tuple[Path | None, dict[str, str]]:
    ev = cfg.evaluate
    if not ev.tasks:
        return None, {}
    d = ev.tasks_dir or os.environ.get("EDGEPRUNE_TASKS_DIR", "")
    if not d:
        raise EdgePruneError("evaluate.tasks needs evaluate.tasks_dir (or $EDGEPRUNE_TASKS_DIR)")
    tasks_dir = Path(d).expanduser()
    return tasks_dir, task_hashes(ev.tasks, tasks_dir)


def plan_stages(cfg: RunConfig, ctx: Context) -> list[Stage]:
    """Validate ``cfg`` (one-line errors before any work) and build the stage list."""
    check_writable_parent(ctx.run_dir / "x")
    cfg.prune.validate()
    cfg.run.validate()
    if cfg.prune.stream:
        from edgeprune.config import check_streamable

        check_streamable(cfg.prune, cfg.run.device)
    targets = cfg.export.targets()
    cfg.evaluate.validate()
    cfg.profile.validate()
    # one per run (the device is identified once, when the first profile stage's key is needed)
    target = Target(cfg.profile) if cfg.profile.enabled else None
    cfg.fit.validate()
    calib = resolve_text(cfg.data.calib, "calib")
    eval_text = resolve_text(cfg.data.eval, "eval")
    tasks_dir, tasks_hash = _tasks(cfg)
    fingerprints = Fingerprints(ctx.run_dir / ".fingerprints.json")
    model, model_fp = cfg.run.model, fingerprints.model(cfg.run.model)  # last: hashing a model takes a moment
    fingerprints.save()

    stages: list[Stage] = [
        EvalStage(ctx, "baseline", model, model_fp, eval_text, cfg.evaluate, cfg.run, tasks_dir, tasks_hash)]
    if cfg.fit.enabled:
        from edgeprune.pipeline.fit_stages import FitPruneStage, FitStage

        stages += [FitStage(ctx, model, model_fp, cfg.fit, cfg.prune, cfg.data, calib, eval_text, cfg.evaluate,
                            cfg.profile, cfg.run),
                   FitPruneStage(ctx, model, model_fp, cfg.prune, calib, cfg.run)]
    else:
        stages.append(PruneStage(ctx, model, model_fp, cfg.prune, calib, cfg.run))
    stages.append(EvalStage(ctx, "pruned", model, "", eval_text, cfg.evaluate, cfg.run, tasks_dir, tasks_hash))
    stages += [ExportStage(ctx, v, fmt, dtype, model, model_fp, cfg.export.optimize)
               for fmt, dtype in targets for v in VARIANTS]
    if cfg.evaluate.artifacts:
        stages += [ArtifactPPLStage(ctx, v, fmt, dtype, eval_text, cfg.evaluate)
                   for fmt, dtype in targets for v in VARIANTS]
    if cfg.profile.enabled:
        stages += [ProfileStage(ctx, v, fmt, dtype, cfg.profile, target) for fmt, dtype in targets for v in VARIANTS]
    ablation = _ablation_source(cfg)
    stages.append(ReportStage(ctx, ablation, sha256_file(ablation) if ablation else None,
                              deps=tuple(s.name for s in stages)))
    return stages
