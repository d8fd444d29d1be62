"""The stages of a run with a ``[fit]`` section: `edgeprune fit` chooses the pruning ratio and dtype instead of
``prune.ratio``.

    FitStage        edgeprune.fit.run.fit with the run's model, recipe ([prune]), texts ([data]) and PPL settings
                    ([evaluate]): predictions, the choice, prune + export + PPL + profile of it (and one step on a
                    measured miss); its result is fit.json. Its checkpoints and artifacts live in RUN_DIR/fit-work
                    (outside the stage, so a rerun with other targets reuses every configuration pruned before)
                    and the final checkpoint is linked into the stage as ``model``.
    FitPruneStage   the ``prune`` stage of such a run: the checkpoint fit chose, with the same result as a
                    ``PruneStage`` at that ratio and the same key (a rerun whose fit chooses the same ratio
                    recomputes nothing after it).

Not here: the search and the measurements (edgeprune/fit/), the report's Fit section (edgeprune/report_fit.py).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from edgeprune.config import DataSpec, ModelLoad, PruneConfig
from edgeprune.data import Text
from edgeprune.errors import EdgePruneError
from edgeprune.io import MANIFEST
from edgeprune.pipeline.config import FIT_TARGETS, EvaluateSection, FitSection, ProfileSection, section_dict
from edgeprune.pipeline.engine import Stage
from edgeprune.pipeline.stages import Context, PruneResult, PruneStage, load_inputs
from edgeprune.rundir import FIT_WORK, read_stage, stage_dir

FIT = "fit"
# what prune_model returns (the checkpoint's manifest holds it beside its own fields)
RECORD_KEYS = ("config", "calibration", "plan", "layer_shapes", "rounds", "recovery", "params_before",
               "params_after", "decoder_reduction", "total_reduction", "seconds", "peak_rss_mib")


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` made of hard links (files are written once and replaced, never changed in
    place), or real copies where links are not possible."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


@dataclass
class FitStage(Stage):
    """Choose, prune, export, evaluate and profile the configuration that meets [fit]'s targets."""

    ctx: Context
    model: str
    model_fp: str
    fit: FitSection
    prune: PruneConfig
    data: DataSpec
    calib: Text
    text: Text
    ev: EvaluateSection
    prof: ProfileSection
    load: ModelLoad
    name: str = FIT

    def __post_init__(self):
        self.check()
        active = ", ".join(f"{k} {v:g}" for k, v in self.fit.targets().active().items())
        self.title = f"fit {self.device}: {active}"

    def check(self) -> None:
        """One-line errors for [fit] settings before any work: targets, device profile, format and dtypes."""
        from edgeprune.devices import profiles
        from edgeprune.fit.search import FORMAT_DTYPES

        self.fit.targets().validate()
        prof = profiles.load(self.device)
        fmt = self.fit.format or prof.preferred_format
        prof.check_format(fmt)
        bad = [d for d in self.fit.dtypes if d not in FORMAT_DTYPES[fmt]]
        if bad:
            raise EdgePruneError(f"fit.dtypes: {fmt} takes {', '.join(FORMAT_DTYPES[fmt])}, not {', '.join(bad)}")

    @property
    def device(self) -> str:
        return self.fit.device or self.prof.device

    @property
    def threads(self) -> str | None:
        return self.fit.threads or (str(self.prof.threads) if self.prof.threads else None)

    def inputs(self) -> dict:
        return {"model": self.model_fp, "fit": {**section_dict(self.fit), "device": self.device,
                                                 "threads": self.threads},
                "prune": {k: v for k, v in section_dict(self.prune).items() if k != "ratio"},
                "calib": self.calib.sha256, "text": self.text.sha256, "seq_len": self.ev.seq_len,
                "max_tokens": self.ev.max_tokens, **load_inputs(self.load)}

    def options(self, out: Path):
        from edgeprune.fit.run import FitOptions

        f = self.fit
        return FitOptions(
            model=self.model, device=self.device, targets=f.targets(), fmt=f.format or None,
            dtypes=list(f.dtypes) or None, host=f.host or None, out=out, work=self.ctx.run_dir / FIT_WORK,
            threads=self.threads, budget=f.budget, prune=self.prune,
            data={"calib": self.data.calib, "eval": self.data.eval},
            evaluate={"seq_len": self.ev.seq_len, "batch_size": self.ev.batch_size, "threads": self.ev.threads},
            max_tokens=self.ev.max_tokens or None,
            load={} if self.load.is_default else {"device": self.load.device, "dtype": self.load.dtype})

    def run(self, out: Path) -> dict:
        from edgeprune.fit.cli import summary
        from edgeprune.fit.run import fit
        from edgeprune.fit.search import Unreachable

        try:
            result = fit(self.options(out))
        except Unreachable as e:  # the message names the command's flags: name the config keys instead
            msg = str(e)
            for name in (*FIT_TARGETS, "prompt_tokens"):
                msg = msg.replace(f"--{name.replace('_', '-')}", f"fit.{name}")
            raise EdgePruneError(msg) from None
        for line in summary(result):
            self.ctx.console.print(f"  {line}", highlight=False, soft_wrap=True)
        if not result["met"]:
            self.ctx.console.print(f"  fit: the measured artifact misses {', '.join(result['final']['missed'])}; "
                                   "the run goes on with it (the report says so)", highlight=False)
        link_tree(Path(result["final"]["checkpoint"]), out / "model")
        return result


def fit_choice(run_dir: Path) -> dict:
    """The fit stage's final attempt and recipe, from its stage.json."""
    s = read_stage(stage_dir(run_dir, FIT))
    if s is None:
        raise EdgePruneError(f"the fit stage of {run_dir} has no result (rerun to compute it)")
    r = s["result"]
    return {**r["final"], "recipe": r["recipe"]}


@dataclass
class FitPruneStage(PruneStage):
    """The ``prune`` stage of a run with [fit]: fit's final checkpoint, keyed like a prune to its ratio."""

    def __post_init__(self):
        self.title = "the checkpoint fit chose"

    def _config(self) -> tuple[PruneConfig, dict]:
        choice = fit_choice(self.ctx.run_dir)
        cost = choice["recipe"].get("unit_cost")
        return replace(self.config, ratio=choice["ratio"], unit_cost=cost), choice

    def inputs(self) -> dict:
        cfg, _ = self._config()
        base = PruneStage.inputs(replace(self, config=cfg))
        return {**base, **({"unit_cost": cfg.unit_cost} if cfg.unit_cost is not None else {})}

    def run(self, out: Path) -> PruneResult:
        from edgeprune.models import load
        from edgeprune.models.info import layer_param_counts, param_counts

        cfg, choice = self._config()
        link_tree(stage_dir(self.ctx.run_dir, FIT) / "model", out / "model")
        try:
            man = json.loads((out / "model" / MANIFEST).read_text())
        except (OSError, ValueError):
            man = {}
        dense = load(self.model, device=self.load.device, dtype=self.load.dtype)
        before = [layer_param_counts(layer) for layer in dense.adapter.layers]
        record = {k: man[k] for k in RECORD_KEYS if k in man}
        if "config" not in record:  # ratio 0: fit chose the unpruned model in another dtype
            counts = param_counts(dense.adapter)
            record = {"config": {**cfg.to_dict(), "ratio": 0.0}, "params_before": counts, "params_after": counts,
                      "decoder_reduction": 0.0, "total_reduction": 0.0}
            after = before
        else:
            pruned = load(str(out / "model"), device=self.load.device, dtype=self.load.dtype)
            after = [layer_param_counts(layer) for layer in pruned.adapter.layers]
        return {**record, "shapes_before": [s.to_dict() for s in dense.adapter.shapes()],
                "layer_params_before": before, "layer_params_after": after, "checkpoint": "model",
                "chosen_by": f"fit: {choice['format']} {choice['dtype']}, ratio {choice['ratio']:.2f}"}
