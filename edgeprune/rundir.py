"""The layout of an `edgeprune run` directory: stage names, where each stage lives, how its stage.json reads.
The pipeline writes run directories with it and the report reads them with it; neither knows the other.

    RUN_DIR/manifest.json         the latest run: stage statuses, keys, the resolved config
    RUN_DIR/config.toml           the resolved settings
    RUN_DIR/stages/NAME/          one directory per stage: stage.json (key, inputs, result) and its outputs
    RUN_DIR/report/               the report stage (its stage.json beside report.html/.md/.json)
    RUN_DIR/inputs/ablation.json  the ablation table the report includes
    RUN_DIR/logs/NAME.log         the traceback of a failed stage
    RUN_DIR/fit-work/             with [fit]: every configuration fit pruned or exported (reused across reruns)

Stage names are built here only (``StageId.name``), never parsed back: a reader that wants the export stages
asks each stage's own result for its variant, format and dtype and checks the name it would have.
Not here: running stages (edgeprune/pipeline/engine.py), the report's content (edgeprune/report.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeprune.io import MANIFEST

STAGE_FILE = "stage.json"
REPORT = "report"
VARIANTS = ("baseline", "pruned")  # the unpruned model and the pruned one
ABLATION = Path("inputs") / "ablation.json"
CONFIG_FILE = "config.toml"
FIT_WORK = "fit-work"
RUN_KIND = "edgeprune-run"  # the manifest's kind
STAGE_KIND = "pipeline-stage"  # a stage.json's kind

__all__ = ["ABLATION", "CONFIG_FILE", "FIT_WORK", "MANIFEST", "REPORT", "RUN_KIND", "STAGE_FILE", "STAGE_KIND", "VARIANTS",
           "StageId", "artifact_dir", "log_path", "read_stage", "read_stages", "stage_dir"]


@dataclass(frozen=True)
class StageId:
    """What a stage is: its kind (eval, prune, export, ppl, profile, report) and, where it applies, the model
    variant and the artifact's format and dtype."""

    kind: str
    variant: str | None = None
    format: str | None = None
    dtype: str | None = None

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.kind, self.variant, self.format, self.dtype) if p)


def stage_dir(run_dir: Path, name: str) -> Path:
    return run_dir / REPORT if name == REPORT else run_dir / "stages" / name


def artifact_dir(run_dir: Path, variant: str, fmt: str, dtype: str) -> Path:
    return stage_dir(run_dir, StageId("export", variant, fmt, dtype).name) / "artifact"


def log_path(run_dir: Path, name: str) -> Path:
    return run_dir / "logs" / f"{name}.log"


def read_stage(d: Path) -> dict | None:
    """A complete stage's stage.json, or None (missing, unreadable, or not a stage record)."""
    try:
        data = json.loads((d / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "key" in data and "result" in data else None


def read_stages(run_dir: Path) -> dict[str, dict]:
    """Every complete stage of a run directory: name -> its stage.json."""
    out = {}
    for d in sorted((run_dir / "stages").glob("*")) + [run_dir / REPORT]:
        s = read_stage(d)
        if s is not None:
            out[s.get("name", d.name)] = s
    return out
