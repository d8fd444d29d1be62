"""`edgeprune run`: the whole pipeline, for the pruned model and for the unpruned baseline, in one run directory.

    config.py       the typed run configuration (TOML, --set, direct options)
    plan.py         validate it and build the stage list
    stages.py       the stage bodies (eval, prune, export, artifact PPL, profile, report)
    fit_stages.py   with a [fit] target: the fit stage and the prune stage that takes fit's checkpoint
    engine.py       the domain-free engine: content-keyed stages, atomic writes, a lock, resume
    fingerprint.py  content hashes of models and task files
    profiling.py    `edgeprune profile` in a separate process and its summary

Imports go one way: edgeprune.cli -> edgeprune.pipeline -> its stages -> the library (prune, export, report, ...);
the run directory's layout is edgeprune.rundir, which the report reads too. Importing this package is cheap
(no torch): the stages import what they need when they run.
"""

from __future__ import annotations

from pathlib import Path

from edgeprune.pipeline.config import RunConfig, defaults, dump_toml, load_config, parse_override
from edgeprune.pipeline.engine import Engine, RunResult, Stage
from edgeprune.pipeline.plan import plan_stages
from edgeprune.pipeline.stages import Context
from edgeprune.rundir import CONFIG_FILE, REPORT

__all__ = ["RunConfig", "RunResult", "defaults", "dump_toml", "load_config", "parse_override", "plan",
           "run_pipeline"]


def _context(cfg: RunConfig, progress: bool, console) -> Context:
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    return Context(Path(cfg.run.out).expanduser(), console, progress)


def plan(cfg: RunConfig, *, progress: bool = True, console=None) -> list[Stage]:
    """The stage list of ``cfg`` (validates everything; loads no model)."""
    return plan_stages(cfg, _context(cfg, progress, console))


def run_pipeline(cfg: RunConfig, *, progress: bool = True, console=None) -> RunResult:
    ctx = _context(cfg, progress, console)
    stages = plan_stages(cfg, ctx)
    meta = {"config": cfg.to_dict(), "report": {"html": f"{REPORT}/report.html", "markdown": f"{REPORT}/report.md",
                                                "json": f"{REPORT}/report.json"}}
    return Engine(ctx.run_dir, ctx.console, meta, {CONFIG_FILE: dump_toml(cfg)}).run(stages)
