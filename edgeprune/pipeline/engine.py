"""A small, domain-free stage engine: content-keyed stages, atomic stage directories, one run per directory,
resume after a failure or an interruption.

A stage has a name, the names of the stages it reads (``deps``), the inputs its result depends on, and a body
that writes its outputs into a directory and returns a JSON-ready result. Its key is a hash of its inputs, the
keys of its deps and the edgeprune version; ``RUN_DIR/stages/NAME/stage.json`` holds the key and the result, and
a stage whose stored key matches is not recomputed (``cached``). Every stage is written to a temp directory and
renamed into place (edgeprune.io.atomic_dir), so an interrupted run leaves only complete stages behind; a
failing stage stops the run with one line, keeps the earlier stages and leaves its traceback in ``logs/``.
``RUN_DIR/manifest.json`` lists the stages of the latest run with their status, key and seconds.

Not here: what any stage does (edgeprune/pipeline/stages.py) or which stages a run has (plan.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from edgeprune import __version__
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.io import atomic_dir, manifest, write_json
from edgeprune.rundir import (
    MANIFEST,
    REPORT,
    RUN_KIND,
    STAGE_FILE,
    STAGE_KIND,
    log_path,
    read_stage,
    stage_dir,
)


class Stage:
    """One unit of work. Subclasses set ``name``/``title``/``deps`` and implement ``inputs`` and ``run``."""

    name: str = ""
    title: str = ""
    deps: tuple[str, ...] = ()

    def inputs(self) -> dict:
        """Everything the result depends on besides the deps' keys (hashed into the stage's key)."""
        raise NotImplementedError

    def run(self, out: Path) -> dict:
        """Write outputs into ``out`` (a temp directory) and return the JSON-ready result."""
        raise NotImplementedError


def stage_key(name: str, inputs: dict, deps: dict[str, str]) -> str:
    blob = json.dumps({"stage": name, "inputs": inputs, "deps": deps, "edgeprune": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class StageStatus:
    name: str
    status: str  # computed | cached | failed | interrupted | pending
    key: str
    seconds: float = 0.0
    directory: str = ""
    error: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "key": self.key, "seconds": round(self.seconds, 2),
                "directory": self.directory, "error": self.error}


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageStatus]
    results: dict[str, dict]

    @property
    def statuses(self) -> dict[str, str]:
        return {s.name: s.status for s in self.stages}

    @property
    def report_html(self) -> Path:
        return stage_dir(self.run_dir, REPORT) / "report.html"


class RunLock:
    """One run per run directory at a time (an advisory lock on RUN_DIR/.lock, released when the process ends)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.f = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise EdgePruneError(f"another `edgeprune run` is using {self.path.parent}") from None
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()
        return False


def remove_leftovers(run_dir: Path) -> None:
    """Temp directories of a run that was killed mid-stage (SIGKILL, power loss): never a complete stage."""
    for parent in (run_dir, run_dir / "stages"):
        for p in list(parent.glob(".*.tmp")) + list(parent.glob(".*.old-*")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


class Engine:
    """Runs a list of stages (in order; deps come first) in one run directory. ``meta`` goes into the manifest;
    ``files`` (name -> text) are written into the run directory once the run holds its lock."""

    def __init__(self, run_dir: Path, console, meta: dict[str, Any] | None = None,
                 files: dict[str, str] | None = None):
        self.run_dir = run_dir
        self.console = console
        self.meta = meta or {}
        self.files = files or {}
        self.keys: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.statuses: list[StageStatus] = []

    def run(self, stages: list[Stage]) -> RunResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir):
            remove_leftovers(self.run_dir)
            for name, text in self.files.items():
                (self.run_dir / name).write_text(text)
            self.statuses = [StageStatus(s.name, "pending", "") for s in stages]
            self._write_manifest("running")
            for i, (stage, st) in enumerate(zip(stages, self.statuses, strict=True), 1):
                self._run_stage(stage, st, f"[{i:>2}/{len(stages)}] {stage.name}")
            self._write_manifest("complete")
        return RunResult(self.run_dir, self.statuses, self.results)

    def _run_stage(self, stage: Stage, st: StageStatus, label: str) -> None:
        try:
            inputs = stage.inputs()  # may ask a device who it is (a profile stage's key)
        except EdgePruneError as e:
            self._fail(stage, st, e, 0.0)
        deps = {d: self.keys[d] for d in stage.deps}
        st.key = self.keys[stage.name] = stage_key(stage.name, inputs, deps)
        d = stage_dir(self.run_dir, stage.name)
        st.directory = str(d.relative_to(self.run_dir))
        cached = read_stage(d)
        if cached is not None and cached.get("key") == st.key:
            self.results[stage.name] = cached["result"]
            st.status = "cached"
            self.console.print(f"{label}: cached", highlight=False)
            self._write_manifest("running")  # the report reads the stages of the manifest, cached ones too
            return
        self.console.print(f"{label}: {stage.title or stage.name} ...", highlight=False)
        start = time.perf_counter()
        try:
            with atomic_dir(d) as tmp:
                result = stage.run(tmp)
                st.seconds = time.perf_counter() - start
                write_json(tmp / STAGE_FILE, manifest(STAGE_KIND, name=stage.name, key=st.key, inputs=inputs,
                                                      deps=deps, seconds=round(st.seconds, 2), result=result))
        except KeyboardInterrupt:
            st.status, st.seconds = "interrupted", time.perf_counter() - start
            self._write_manifest("interrupted")
            raise
        except Exception as e:
            self._fail(stage, st, e, time.perf_counter() - start)
        self.results[stage.name] = result
        st.status = "computed"
        self.console.print(f"{label}: done in {st.seconds:.1f} s", highlight=False)
        self._write_manifest("running")

    def _fail(self, stage: Stage, st: StageStatus, e: Exception, seconds: float) -> NoReturn:
        st.status, st.seconds = "failed", seconds
        st.error = first_line(e) if isinstance(e, EdgePruneError) else f"{type(e).__name__}: {first_line(e)}"
        log = log_path(self.run_dir, stage.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(e)))
        self._write_manifest("failed")
        raise EdgePruneError(f"stage {stage.name} failed: {st.error} (earlier stages are kept in {self.run_dir}; "
                             f"traceback in {log}; rerun to resume)") from None

    def _write_manifest(self, status: str) -> None:
        write_json(self.run_dir / MANIFEST, manifest(
            RUN_KIND, status=status, edgeprune=__version__, **self.meta,
            stages=[s.to_dict() for s in self.statuses]))
