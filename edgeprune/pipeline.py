"""`edgeprune run`: the whole pipeline, for the pruned model and for the unpruned baseline, in one run directory.

Stages (every one for both models where it applies)::

    eval-baseline                         PyTorch fp32 PPL (+ zero-shot) of the unpruned model
    prune                                 PIEM scoring -> LSPS allocation -> surgery -> checkpoint
    eval-pruned                           the same evaluation of the pruned checkpoint
    export-{baseline,pruned}-FMT-DTYPE    ONNX / GGUF artifacts (INT8 included) with their parity checks
    ppl-{baseline,pruned}-FMT-DTYPE       PPL of each artifact in its own runtime (onnxruntime, llama.cpp)
    profile-{baseline,pruned}-FMT-DTYPE   TTFT, decode tokens/s and peak RSS on the chosen device
    report                                report.json, report.md and a self-contained report.html

A stage's key is a hash of its inputs: its config section, the keys of the stages it reads, the content hash of
its data and model, and the edgeprune version. ``RUN_DIR/stages/NAME/stage.json`` holds the key and the result; a
stage whose key is unchanged is not recomputed. Every stage directory is written to a temp directory and renamed
into place, so an interrupted run leaves only complete stages behind and the next run resumes; a failing stage
stops the run with one line and leaves the earlier stages as they were. ``RUN_DIR/manifest.json`` lists the
stages of the latest run with their status (computed / cached / failed), keys and timings.

Importing this module is cheap (no torch): the stages import what they need.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune import __version__
from edgeprune.errors import EdgePruneError, first_line
from edgeprune.io import MANIFEST, atomic_dir, manifest, read_toml, sha256_file, write_json

CONFIG_DIR = Path(__file__).parent / "configs"
STAGE_FILE = "stage.json"
VARIANTS = ("baseline", "pruned")

# The configuration schema: every key a config may set, with its default. A key's type is its default's type.
DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {
        "model": "default",  # 'default', a local HF directory, a .gguf file or a hub id
        "out": "out/run",  # the run directory
    },
    "data": {
        # a text spec ('builtin', a file, a directory, wikitext2|ptb|c4) or a list of them: the first one present
        "calib": "builtin",
        "eval": "builtin",
    },
    "prune": {
        "ratio": 0.2,
        "scorer": "piem",
        "allocator": "lsps",
        "sensitivity": "bi",
        "probe_ratio": 0.3,
        "tau": 1.0,
        "min_module_ratio": 0.0,
        "max_module_ratio": 0.8,
        "bias_compensation": False,
        "attn_unit": "group",
        "round_to": 1,
        "rounds": 1,
        "n_samples": 32,
        "seq_len": 128,
        "seed": 0,
        "sensitivity_samples": 16,
        "piem_weights": [],  # [alpha, beta, gamma]; empty: the scorer's defaults
    },
    "evaluate": {
        "seq_len": 128,
        "max_tokens": 8192,  # 0: the whole text
        "batch_size": 8,
        "tasks": [],  # zero-shot tasks (piqa, arc_easy, arc_challenge, boolq, openbookqa); empty: none
        "tasks_dir": "",  # directory with the task files ('' = $EDGEPRUNE_TASKS_DIR)
        "limit": 0,  # first N examples per task; 0: all
        "artifacts": True,  # PPL of every exported artifact in its runtime
        "threads": 0,  # runtime threads for the artifacts' PPL (0: the runtime's choice; not part of any key)
    },
    "export": {
        "artifacts": ["gguf:q8_0", "onnx:int8"],  # FORMAT:DTYPE, each for the baseline and the pruned model
        "optimize": False,  # ONNX: onnxruntime's transformer optimizer
    },
    "profile": {
        "enabled": True,
        "device": "cpu",
        "prompt_tokens": 64,
        "new_tokens": 32,
        "repeats": 3,
        "threads": 0,  # 0: the runtime's choice
        "args": [],  # extra arguments for `edgeprune profile`
    },
    "report": {
        "ablation": "bench/results/ablation.json",  # copied into the run when present; '' = none
    },
}


# ----------------------------------------------------------------------------------------------- configuration


def _toml_value(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string: --set data.eval=corpus/test.txt


def resolve_config_path(spec: str | Path | None) -> Path:
    """A config file, or the name of a packaged config ('demo')."""
    if spec is None:
        return CONFIG_DIR / "demo.toml"
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{spec}.toml"
    if "/" not in str(spec) and packaged.is_file():
        return packaged
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise EdgePruneError(f"config not found: {spec} (a TOML file, or a packaged config: {names})")


def config_schema() -> dict[str, dict[str, Any]]:
    """``DEFAULTS`` plus every scalar PruneConfig field it does not list (new pruning options are configurable
    without touching this module)."""
    from dataclasses import MISSING, fields

    schema = copy.deepcopy(DEFAULTS)
    try:
        from edgeprune.prune import PruneConfig
    except ImportError:
        return schema
    for f in fields(PruneConfig):
        if f.name not in schema["prune"] and isinstance(f.default, (bool, int, float, str)) \
                and f.default is not MISSING:
            schema["prune"][f.name] = f.default
    return schema


def _coerce(schema: dict, section: str, key: str, value: Any) -> Any:
    default = schema[section][key]
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise EdgePruneError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise EdgePruneError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EdgePruneError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise EdgePruneError(f"{where} must be a list, got {value!r}")
        return value
    # strings; the data specs also take a list of candidates
    if section == "data" and isinstance(value, list) and all(isinstance(v, str) for v in value) and value:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise EdgePruneError(f"{where} must be a string, got {value!r}")
    return value


def _merge(schema: dict, cfg: dict, data: dict, origin: str) -> None:
    for section, values in data.items():
        if section not in schema:
            raise EdgePruneError(f"{origin}: unknown section [{section}] (known: {', '.join(schema)})")
        if not isinstance(values, dict):
            raise EdgePruneError(f"{origin}: [{section}] must be a table")
        for key, value in values.items():
            if key not in schema[section]:
                raise EdgePruneError(f"{origin}: unknown key {section}.{key} (known: "
                                     f"{', '.join(schema[section])})")
            cfg[section][key] = _coerce(schema, section, key, value)


def parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` (the value in TOML syntax; a bare word is a string)."""
    if "=" not in item:
        raise EdgePruneError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
    name, _, raw = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not dot or not key:
        raise EdgePruneError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
    return section, key, _toml_value(raw.strip())


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                **direct: Any) -> dict:
    """The defaults, then the config file, then ``--set`` overrides, then direct options (``model``, ``ratio``,
    ``device``, ``out``; None = not given). Unknown sections and keys are errors."""
    schema = config_schema()
    cfg = copy.deepcopy(schema)
    cfg_path = resolve_config_path(path)
    _merge(schema, cfg, read_toml(cfg_path, "config"), str(cfg_path))
    for item in overrides:
        section, key, value = parse_override(item)
        _merge(schema, cfg, {section: {key: value}}, "--set")
    places = {"model": ("run", "model"), "out": ("run", "out"), "ratio": ("prune", "ratio"),
              "device": ("profile", "device")}
    for name, value in direct.items():
        if value is not None:
            section, key = places[name]
            _merge(schema, cfg, {section: {key: value if not isinstance(value, Path) else str(value)}},
                   f"--{name}")
    return cfg


def dump_toml(cfg: dict) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def artifact_targets(cfg: dict) -> list[tuple[str, str]]:
    from edgeprune.export.artifacts import DTYPES, FORMATS

    targets = []
    for item in cfg["export"]["artifacts"]:
        fmt, sep, dtype = str(item).partition(":")
        dtype = {"f32": "fp32", "f16": "fp16"}.get(dtype, dtype)  # GGUF's names for the float types
        if not sep or fmt not in FORMATS or dtype not in DTYPES:
            raise EdgePruneError(f"export.artifacts: {item!r} is not FORMAT:DTYPE (formats {', '.join(FORMATS)}; "
                                 f"dtypes {', '.join(DTYPES)})")
        if fmt == "onnx" and DTYPES[dtype][0] is None:
            raise EdgePruneError(f"export.artifacts: {item!r}: {dtype} is a GGUF type; ONNX takes fp32, fp16, int8")
        if (fmt, dtype) not in targets:
            targets.append((fmt, dtype))
    return targets


def prune_config(section: dict):
    """Validate the [prune] section (the same checks as `edgeprune prune`) and build a PruneConfig."""
    from dataclasses import fields

    from edgeprune.prune import PruneConfig

    s = section
    options = {}
    if s["piem_weights"]:
        if s["scorer"] != "piem" or len(s["piem_weights"]) != 3:
            raise EdgePruneError("prune.piem_weights takes three numbers [alpha, beta, gamma] with scorer 'piem'")
        options = dict(zip(("alpha", "beta", "gamma"), (float(x) for x in s["piem_weights"]), strict=True))
    known = {f.name for f in fields(PruneConfig)}
    cfg = PruneConfig(**{k: v for k, v in s.items() if k in known}, scorer_options=options)
    cfg.validate()
    return cfg


def prune_checkpoint(lm, cfg, calib, out_dir: Path, model_spec: str, progress: bool = True) -> dict:
    """Score, allocate, cut and save: what `edgeprune prune` does after loading. Returns the prune record with
    the per-layer shapes and parameter counts before and after."""
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models.info import layer_param_counts
    from edgeprune.prune import prune_model

    shapes_before = [s.to_dict() for s in lm.adapter.shapes()]
    layer_params_before = [layer_param_counts(layer) for layer in lm.adapter.layers]
    record = prune_model(lm, cfg, calib, progress=progress)
    save_checkpoint(lm, out_dir, {"source_model": model_spec, "source": lm.source, **record})
    record["shapes_before"] = shapes_before
    record["layer_params_before"] = layer_params_before
    record["layer_params_after"] = [layer_param_counts(layer) for layer in lm.adapter.layers]
    return record


# ------------------------------------------------------------------------------------------------- hashing


def stage_key(name: str, inputs: dict, deps: dict[str, str]) -> str:
    blob = json.dumps({"stage": name, "inputs": inputs, "deps": deps, "edgeprune": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Fingerprints:
    """Content hashes of model files, remembered by (path, size, mtime) in the run directory."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def file(self, p: Path) -> str:
        st = p.stat()
        tag = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if tag not in self.known:
            self.known[tag] = sha256_file(p)
            self.changed = True
        return self.known[tag]

    def model(self, spec: str) -> str:
        from edgeprune.models.loader import DEFAULT_MODEL, resolve_default_gguf

        if spec == DEFAULT_MODEL:
            return "gguf:" + self.file(resolve_default_gguf())
        path = Path(spec).expanduser()
        if path.is_file():
            return "file:" + self.file(path)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(path).parts))
            if not files:
                raise EdgePruneError(f"model directory {path} is empty")
            h = hashlib.sha256()
            for f in files:
                h.update(f"{f.relative_to(path)}\0{self.file(f)}\n".encode())
            return "dir:" + h.hexdigest()
        from edgeprune.models.loader import _HUB_ID

        if not _HUB_ID.match(spec):
            raise EdgePruneError(f"model not found: {spec} (no such file or directory)")
        return "hub:" + spec  # a hub id: the name is all we know before loading

    def save(self) -> None:
        if self.changed:
            write_json(self.path, self.known)


def resolve_text(spec: str | list[str], split: str):
    """The first text spec of a list that is present ('builtin' always is)."""
    from edgeprune.data import BUILTIN, DATASETS, load_text

    candidates = spec if isinstance(spec, list) else [spec]
    for c in candidates:
        if c == BUILTIN or c in DATASETS or Path(c).expanduser().exists():
            return load_text(c, split)
    raise EdgePruneError(f"none of the {split} texts exist: {', '.join(candidates)}")


def _tasks_files(tasks: list[str], tasks_dir: Path) -> dict[str, str]:
    from edgeprune.evaluate.zeroshot import _FILES, _PIQA_LABELS, TASKS

    out = {}
    for t in tasks:
        if t not in TASKS:
            raise EdgePruneError(f"unknown zero-shot task '{t}' (known: {', '.join(TASKS)})")
        rels = [_FILES[t]] + ([_PIQA_LABELS] if t == "piqa" else [])
        for rel in rels:
            p = tasks_dir / rel
            if not p.is_file():
                raise EdgePruneError(f"{t} data file not found: {p}")
            out[rel] = sha256_file(p)
    return out


# -------------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str
    fn: Callable[[Path], dict]  # writes its outputs into the (temp) directory, returns the JSON-ready result
    inputs: dict
    deps: list[str] = field(default_factory=list)
    title: str = ""
    directory: Path | None = None  # default: RUN_DIR/stages/NAME


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
        return self.run_dir / "report" / "report.html"


class Pipeline:
    def __init__(self, cfg: dict, *, progress: bool = True, console=None):
        from rich.console import Console

        self.cfg = cfg
        self.progress = progress
        self.console = console or Console(stderr=True)
        self.run_dir = Path(cfg["run"]["out"]).expanduser()
        self.results: dict[str, dict] = {}
        self.keys: dict[str, str] = {}
        self.statuses: list[StageStatus] = []

    # -- paths -----------------------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        return self.run_dir / "report" if name == "report" else self.run_dir / "stages" / name

    def model_spec(self, variant: str) -> str:
        return self.cfg["run"]["model"] if variant == "baseline" else str(self.stage_dir("prune") / "model")

    def artifact_dir(self, variant: str, fmt: str, dtype: str) -> Path:
        return self.stage_dir(f"export-{variant}-{fmt}-{dtype}") / "artifact"

    # -- planning --------------------------------------------------------------------------------------------
    def plan(self) -> list[Stage]:
        """Validate the whole config and build the stage list (cheap: no model is loaded)."""
        cfg = self.cfg
        from edgeprune.io import check_writable_parent

        check_writable_parent(self.run_dir / "x")
        pcfg = prune_config(cfg["prune"])
        targets = artifact_targets(cfg)
        ev = cfg["evaluate"]
        if ev["seq_len"] < 2 or ev["batch_size"] < 1 or min(ev["max_tokens"], ev["limit"], ev["threads"]) < 0:
            raise EdgePruneError("evaluate.seq_len must be at least 2, batch_size at least 1, max_tokens and "
                                 "limit at least 0")
        prof = cfg["profile"]
        if prof["prompt_tokens"] < 1 or prof["new_tokens"] < 2 or prof["repeats"] < 1 or prof["threads"] < 0:
            raise EdgePruneError("profile.prompt_tokens and repeats must be at least 1, new_tokens at least 2")
        self.calib = resolve_text(cfg["data"]["calib"], "calib")
        self.eval_text = resolve_text(cfg["data"]["eval"], "eval")
        tasks_hash = {}
        self.tasks_dir = None
        if ev["tasks"]:
            d = ev["tasks_dir"] or os.environ.get("EDGEPRUNE_TASKS_DIR", "")
            if not d:
                raise EdgePruneError("evaluate.tasks needs evaluate.tasks_dir (or $EDGEPRUNE_TASKS_DIR)")
            self.tasks_dir = Path(d).expanduser()
            tasks_hash = _tasks_files(ev["tasks"], self.tasks_dir)
        self.fingerprints = Fingerprints(self.run_dir / ".fingerprints.json")
        model_fp = self.fingerprints.model(cfg["run"]["model"])  # last: hashing a model takes a moment
        self.fingerprints.save()

        eval_inputs = {"seq_len": ev["seq_len"], "max_tokens": ev["max_tokens"], "text": self.eval_text.sha256,
                       "tasks": ev["tasks"], "limit": ev["limit"], "task_files": tasks_hash}
        stages = [
            Stage("eval-baseline", lambda d: self._eval(d, "baseline"), {"model": model_fp, **eval_inputs},
                  title="evaluate the unpruned model (PyTorch fp32)"),
            Stage("prune", lambda d: self._prune(d, pcfg), {"model": model_fp, "prune": cfg["prune"],
                                                            "calib": self.calib.sha256},
                  title=f"PIEM scoring + {pcfg.allocator.upper()} pruning, ratio {pcfg.ratio:g}"),
            Stage("eval-pruned", lambda d: self._eval(d, "pruned"), eval_inputs, deps=["prune"],
                  title="evaluate the pruned model (PyTorch fp32)"),
        ]
        base_dep = {"model": model_fp}
        for fmt, dtype in targets:
            for v in VARIANTS:
                stages.append(Stage(f"export-{v}-{fmt}-{dtype}",
                                    lambda d, v=v, fmt=fmt, dtype=dtype: self._export(d, v, fmt, dtype),
                                    {"format": fmt, "dtype": dtype, "optimize": cfg["export"]["optimize"],
                                     **(base_dep if v == "baseline" else {})},
                                    deps=[] if v == "baseline" else ["prune"], title=f"export {v} {fmt} {dtype}"))
        if ev["artifacts"]:
            for fmt, dtype in targets:
                for v in VARIANTS:
                    stages.append(Stage(f"ppl-{v}-{fmt}-{dtype}",
                                        lambda d, v=v, fmt=fmt, dtype=dtype: self._artifact_ppl(d, v, fmt, dtype),
                                        {"seq_len": ev["seq_len"], "max_tokens": ev["max_tokens"],
                                         "batch_size": ev["batch_size"], "text": self.eval_text.sha256},
                                        deps=[f"export-{v}-{fmt}-{dtype}"], title=f"PPL of {v} {fmt} {dtype}"))
        if prof["enabled"]:
            for fmt, dtype in targets:
                for v in VARIANTS:
                    stages.append(Stage(f"profile-{v}-{fmt}-{dtype}",
                                        lambda d, v=v, fmt=fmt, dtype=dtype: self._profile(d, v, fmt, dtype),
                                        {**prof, "profiler": profiler_kind()}, deps=[f"export-{v}-{fmt}-{dtype}"],
                                        title=f"profile {v} {fmt} {dtype} on {prof['device']}"))
        ablation = self._ablation_source()
        stages.append(Stage("report", self._report,
                            {"ablation": sha256_file(ablation) if ablation else None},
                            deps=[s.name for s in stages], title="report"))
        return stages

    def _ablation_source(self) -> Path | None:
        spec = self.cfg["report"]["ablation"]
        if not spec:
            return None
        p = Path(spec).expanduser()
        return p if p.is_file() else None

    # -- running ---------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        stages = self.plan()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with _run_lock(self.run_dir):
            _remove_leftovers(self.run_dir)
            return self._run(stages)

    def _run(self, stages: list[Stage]) -> RunResult:
        (self.run_dir / "config.toml").write_text(dump_toml(self.cfg))
        self.statuses = [StageStatus(s.name, "pending", "") for s in stages]
        self._write_manifest("running")
        n = len(stages)
        for i, (stage, st) in enumerate(zip(stages, self.statuses, strict=True), 1):
            key = stage_key(stage.name, stage.inputs, {d: self.keys[d] for d in stage.deps})
            st.key = key
            self.keys[stage.name] = key
            d = stage.directory or self.stage_dir(stage.name)
            st.directory = str(d.relative_to(self.run_dir))
            cached = _read_stage(d)
            label = f"[{i:>2}/{n}] {stage.name}"
            if cached is not None and cached.get("key") == key:
                self.results[stage.name] = cached["result"]
                st.status, st.seconds = "cached", 0.0
                self.console.print(f"{label}: cached", highlight=False)
                continue
            self.console.print(f"{label}: {stage.title or stage.name} ...", highlight=False)
            start = time.perf_counter()
            try:
                with atomic_dir(d) as tmp:
                    result = stage.fn(tmp)
                    elapsed = time.perf_counter() - start
                    write_json(tmp / STAGE_FILE, manifest("pipeline-stage", name=stage.name, key=key,
                                                          inputs=stage.inputs, deps={x: self.keys[x] for x in
                                                                                     stage.deps},
                                                          seconds=round(elapsed, 2), result=result))
            except KeyboardInterrupt:
                st.status, st.seconds = "interrupted", time.perf_counter() - start
                self._write_manifest("interrupted")
                raise
            except Exception as e:
                st.status, st.seconds = "failed", time.perf_counter() - start
                msg = first_line(e) if isinstance(e, EdgePruneError) else f"{type(e).__name__}: {first_line(e)}"
                st.error = msg
                log = self.run_dir / "logs" / f"{stage.name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text("".join(traceback.format_exception(e)))
                self._write_manifest("failed")
                raise EdgePruneError(f"stage {stage.name} failed: {msg} (earlier stages are kept in "
                                     f"{self.run_dir}; traceback in {log}; rerun to resume)") from None
            self.results[stage.name] = result
            st.status, st.seconds = "computed", elapsed
            self.console.print(f"{label}: done in {elapsed:.1f} s", highlight=False)
            self._write_manifest("running")
        self._write_manifest("complete")
        return RunResult(self.run_dir, self.statuses, self.results)

    def _write_manifest(self, status: str) -> None:
        write_json(self.run_dir / MANIFEST, manifest(
            "edgeprune-run", status=status, edgeprune=__version__, config=self.cfg,
            stages=[s.to_dict() for s in self.statuses],
            report={"html": "report/report.html", "markdown": "report/report.md", "json": "report/report.json"}))

    # -- the stages ------------------------------------------------------------------------------------------
    def _eval(self, out: Path, variant: str) -> dict:
        from edgeprune.evaluate.ppl import perplexity
        from edgeprune.models import load
        from edgeprune.models.info import param_counts

        ev = self.cfg["evaluate"]
        lm = load(self.model_spec(variant))
        result: dict[str, Any] = {"variant": variant, "params": param_counts(lm.adapter),
                                  "shapes": [s.to_dict() for s in lm.adapter.shapes()]}
        result["ppl"] = perplexity(lm.model, lm.tokenizer, self.eval_text, ev["seq_len"],
                                   max_tokens=ev["max_tokens"] or None, batch_size=ev["batch_size"],
                                   progress=self.progress)
        if ev["tasks"]:
            from edgeprune.evaluate.zeroshot import evaluate_tasks

            result["zeroshot"] = evaluate_tasks(lm.model, lm.tokenizer, ev["tasks"], self.tasks_dir,
                                                limit=ev["limit"] or None, progress=self.progress)
        return result

    def _prune(self, out: Path, pcfg) -> dict:
        from edgeprune.models import load

        lm = load(self.cfg["run"]["model"])
        record = prune_checkpoint(lm, pcfg, self.calib, out / "model", self.cfg["run"]["model"], self.progress)
        record["checkpoint"] = "model"
        return record

    def _export(self, out: Path, variant: str, fmt: str, dtype: str) -> dict:
        from edgeprune.export.artifacts import export_artifact

        spinner = self.console.status(f"exporting {variant} {fmt} {dtype}") if self.progress else _null()
        with spinner:
            info = export_artifact(self.model_spec(variant), fmt, dtype, out / "artifact",
                                   self.cfg["export"]["optimize"])
        art = out / "artifact"
        files = {p.name: p.stat().st_size for p in art.iterdir() if p.is_file()}
        model_files = [n for n in files if n.startswith("model.") and n != MANIFEST]
        return {"variant": variant, "format": fmt, "dtype": dtype, "artifact": "artifact",
                "size_bytes": sum(files[n] for n in model_files), "files": files,
                "parity": info.get("parity", {}), "export_seconds": info.get("seconds")}

    def _artifact_ppl(self, out: Path, variant: str, fmt: str, dtype: str) -> dict:
        ev = self.cfg["evaluate"]
        art = self.artifact_dir(variant, fmt, dtype)
        ids = None
        if (art / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            ids = Tokenizer.from_file(str(art / "tokenizer.json")).encode(
                self.eval_text.text, add_special_tokens=False).ids
        max_tokens = ev["max_tokens"] or None
        spinner = self.console.status(f"PPL of {variant} {fmt} {dtype}") if self.progress else _null()
        with spinner:
            if fmt == "onnx":
                from edgeprune.devices.ort_generate import OrtGenerator

                if ids is None:
                    raise EdgePruneError(f"no tokenizer.json in {art}")
                gen = OrtGenerator(art, threads=ev["threads"] or None)
                r = gen.perplexity(ids, ev["seq_len"], max_tokens=max_tokens, batch_size=ev["batch_size"])
                r["runtime"] = "onnxruntime"
            else:
                from edgeprune.export.gguf import gguf_perplexity

                r = gguf_perplexity(art / "model.gguf", self.eval_text, ev["seq_len"], max_tokens,
                                    token_ids=ids, n_threads=ev["threads"] or None)
                r["runtime"] = "llama.cpp"
        r.update(text=self.eval_text.name, text_sha256=self.eval_text.sha256, variant=variant, format=fmt,
                 dtype=dtype)
        return r

    def _profile(self, out: Path, variant: str, fmt: str, dtype: str) -> dict:
        prof = self.cfg["profile"]
        art = self.artifact_dir(variant, fmt, dtype)
        spinner = self.console.status(f"profiling {variant} {fmt} {dtype}") if self.progress else _null()
        with spinner:
            raw = profile_artifact(art, prof, out / "profile.json")
        return {"variant": variant, "format": fmt, "dtype": dtype, "device": prof["device"],
                **summarize_profile(raw, prof["prompt_tokens"]), "profile": "profile.json",
                "profiler": raw.get("schema") or raw.get("profiler"), "warnings": raw.get("warnings") or []}

    def _report(self, out: Path) -> dict:
        from edgeprune.report import write_report

        src = self._ablation_source()
        inputs = self.run_dir / "inputs"
        if src is not None:
            inputs.mkdir(exist_ok=True)
            shutil.copy2(src, inputs / "ablation.json")
        elif (inputs / "ablation.json").exists():
            (inputs / "ablation.json").unlink()
        paths = write_report(self.run_dir, out, stage_results=self.results)
        return {name: str(p.relative_to(out)) for name, p in paths.items()}


class _run_lock:
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


def _remove_leftovers(run_dir: Path) -> None:
    """Temp directories of a run that was killed mid-stage (SIGKILL, power loss): never a complete stage."""
    for parent in (run_dir, run_dir / "stages"):
        for p in list(parent.glob(".*.tmp")) + list(parent.glob(".*.old-*")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _read_stage(d: Path) -> dict | None:
    try:
        data = json.loads((d / STAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "key" in data and "result" in data else None


def read_stages(run_dir: Path) -> dict[str, dict]:
    """Every complete stage of a run directory: name -> its stage.json."""
    out = {}
    for d in sorted((run_dir / "stages").glob("*")) + [run_dir / "report"]:
        s = _read_stage(d)
        if s is not None:
            out[s.get("name", d.name)] = s
    return out


def run_pipeline(cfg: dict, *, progress: bool = True, console=None) -> RunResult:
    return Pipeline(cfg, progress=progress, console=console).run()


# ------------------------------------------------------------------------------------------------- profiling


def _profile_command_options() -> set[str] | None:
    """The options of `edgeprune profile` (edgeprune.devices' profiler), or None when there is no such command."""
    try:
        import typer

        from edgeprune.cli import app

        group = typer.main.get_command(app)
    except Exception:
        return None
    cmd = getattr(group, "commands", {}).get("profile")
    if cmd is None:
        return None
    return {opt for p in cmd.params for opt in getattr(p, "opts", [])}


def _profiler_module_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("edgeprune.devices.profiler") is not None
    except ImportError:
        return False


def profiler_kind() -> str:
    """Which profiler measures: 'edgeprune profile', the devices module, or the built-in one (part of the key
    of every profile stage, so that a new profiler re-measures)."""
    if _profile_command_options() is not None:
        return "cli"
    return "module" if _profiler_module_available() else "builtin"


def profile_command(art: Path, prof: dict, json_path: Path) -> list[str]:
    """How to profile ``art``: `edgeprune profile` when it exists (device profiles), else the profiler module,
    else (cpu only) the built-in measurement. Settings go only to options the profiler has."""
    settings = {"--prompt-lengths": str(prof["prompt_tokens"]), "--new-tokens": str(prof["new_tokens"]),
                "--decode-prompt": str(prof["prompt_tokens"]), "--repeats": str(prof["repeats"]),
                "--threads": str(prof["threads"]) if prof["threads"] else None}
    extra = [str(a) for a in prof["args"]]
    opts = _profile_command_options()
    if opts is not None:
        cmd = [sys.executable, "-m", "edgeprune", "profile", str(art), "--device", prof["device"],
               "--json", str(json_path)]
    elif _profiler_module_available():
        opts = {"--prompt-lengths", "--new-tokens", "--decode-prompt", "--repeats", "--threads", "--quiet"}
        cmd = [sys.executable, "-m", "edgeprune.devices.profiler", str(art), "--device", prof["device"],
               "--json", str(json_path)]
    else:
        if prof["device"] != "cpu":
            raise EdgePruneError(f"profiling on device '{prof['device']}' needs `edgeprune profile` "
                                 "(edgeprune.devices); only 'cpu' is measured without it")
        args = json.dumps({"art": str(art), "json": str(json_path), "prompt_tokens": prof["prompt_tokens"],
                           "new_tokens": prof["new_tokens"], "repeats": prof["repeats"],
                           "threads": prof["threads"]})
        return [sys.executable, "-c", f"from edgeprune.pipeline import _profile_main; _profile_main({args!r})"]
    for opt, value in settings.items():
        if value is not None and opt in opts and opt not in extra:
            cmd += [opt, value]
    if "--quiet" in opts and "--quiet" not in extra:
        cmd.append("--quiet")
    return cmd + extra


def profile_artifact(art: Path, prof: dict, json_path: Path) -> dict:
    """Profile an artifact in a separate process (so that its peak RSS is the runtime's, not this process's
    torch); see ``profile_command``."""
    cmd = profile_command(art, prof, json_path)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr or p.stdout or "").strip().splitlines() if ln.strip()]
        raise EdgePruneError(f"profiling {art} failed: {lines[-1] if lines else f'exit code {p.returncode}'}")
    try:
        return json.loads(json_path.read_text())
    except (OSError, ValueError):
        raise EdgePruneError(f"the profiler wrote no JSON for {art}") from None


def _find(d: Any, names: tuple[str, ...]) -> Any:
    """The first value under one of ``names`` anywhere in a nested dict (breadth first)."""
    queue = [d]
    while queue:
        cur = queue.pop(0)
        if isinstance(cur, dict):
            for n in names:
                if n in cur and isinstance(cur[n], (int, float)) and not isinstance(cur[n], bool):
                    return cur[n]
            queue += [v for v in cur.values() if isinstance(v, dict)]
    return None


def summarize_profile(raw: dict, prompt_tokens: int | None = None) -> dict:
    """TTFT (ms), decode tokens/s and peak RSS (MiB) from a profiler JSON: edgeprune.devices' schema
    (``edgeprune.profile/1``: TTFT of the prefill row with ``prompt_tokens``) or the built-in profiler's."""
    if str(raw.get("schema", "")).startswith("edgeprune.profile/"):
        rows = raw.get("prefill") or []
        row = next((r for r in rows if r.get("prompt_tokens") == prompt_tokens), rows[0] if rows else {})
        return {"ttft_ms": row.get("ttft_ms"), "ttft_prompt_tokens": row.get("prompt_tokens"),
                "prefill_ms": row.get("prefill_ms"),
                "decode_tokens_per_s": (raw.get("decode") or {}).get("tokens_per_s"),
                "peak_rss_mib": (raw.get("memory") or {}).get("peak_rss_mb"), "load_s": raw.get("load_s")}
    ttft = _find(raw, ("ttft_ms",))
    if ttft is None and (s := _find(raw, ("ttft_s",))) is not None:
        ttft = 1000 * s
    tps = _find(raw, ("decode_tokens_per_s", "decode_tok_s", "decode_tps", "tokens_per_s"))
    if tps is None and (ms := _find(raw, ("decode_ms_per_token",))):
        tps = 1000 / ms
    rss = _find(raw, ("peak_rss_mib", "peak_rss_mb"))
    if rss is None and (b := _find(raw, ("peak_rss_bytes",))) is not None:
        rss = b / 2**20
    return {"ttft_ms": ttft, "ttft_prompt_tokens": _find(raw, ("prompt_tokens",)), "decode_tokens_per_s": tps,
            "peak_rss_mib": rss, "load_s": _find(raw, ("load_s",))}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def _peak_rss_mib() -> float:
    """This process's resident high-water mark. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    child started from the (torch-sized) pipeline process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _profile_main(args_json: str) -> None:
    """Child process of the built-in profiler: imports numpy, onnxruntime or llama.cpp, never torch."""
    import numpy as np

    a = json.loads(args_json)
    art, threads = Path(a["art"]), a["threads"] or None
    n_prompt, n_new, repeats = a["prompt_tokens"], a["new_tokens"], a["repeats"]
    from edgeprune.data import _builtin_text

    text = _builtin_text("eval")
    rss_start = _peak_rss_mib()
    t0 = time.perf_counter()
    ttft, decode = [], []
    if (art / "model.onnx").is_file():
        from edgeprune.devices.ort_generate import OrtGenerator

        gen = OrtGenerator(art, threads=threads)
        load_s = time.perf_counter() - t0
        ids = gen.encode(text)[:n_prompt]
        gen.generate(ids[:8], max_new_tokens=2, stop_at_eos=False)  # warm-up
        for _ in range(repeats):
            gen.generate(ids, max_new_tokens=n_new, stop_at_eos=False)
            ttft.append(gen.last_timing.ttft_s)
            decode.append(sum(gen.last_timing.token_s) / len(gen.last_timing.token_s))
        runtime = "onnxruntime"
    else:
        import contextlib

        import llama_cpp

        from edgeprune.export.gguf import _no_extra_buffer_types, gguf_dtype

        path = art / "model.gguf"
        quantized = gguf_dtype(path) not in ("f32", "f16")
        with _no_extra_buffer_types(llama_cpp) if quantized else contextlib.nullcontext():
            llm = llama_cpp.Llama(str(path), n_ctx=n_prompt + n_new + 16, n_batch=max(n_prompt, 8),
                                  n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
        load_s = time.perf_counter() - t0
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:n_prompt]

        n_vocab = llm.n_vocab()

        def last_token() -> int:  # greedy pick from the last position's logits (the only ones computed)
            return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

        def once() -> tuple[float, float]:
            llm.reset()
            s = time.perf_counter()
            llm.eval(ids)
            nxt = last_token()
            first = time.perf_counter() - s
            s = time.perf_counter()
            for _ in range(n_new - 1):
                llm.eval([nxt])
                nxt = last_token()
            return first, (time.perf_counter() - s) / (n_new - 1)

        llm.reset()
        llm.eval(ids[:8])  # warm-up
        for _ in range(repeats):
            f, d = once()
            ttft.append(f)
            decode.append(d)
        llm.close()
        runtime = "llama.cpp"
    result = {
        "profiler": "edgeprune.pipeline (built-in, cpu)", "device": "cpu", "runtime": runtime,
        "artifact": str(art), "prompt_tokens": len(ids), "new_tokens": n_new, "repeats": repeats,
        "threads": threads, "load_s": load_s, "ttft_ms": 1000 * _median(ttft),
        "decode_ms_per_token": 1000 * _median(decode), "decode_tokens_per_s": 1 / _median(decode),
        "ttft_ms_all": [1000 * x for x in ttft], "decode_ms_per_token_all": [1000 * x for x in decode],
        "rss_before_load_mib": rss_start,
        "peak_rss_mib": _peak_rss_mib(),
        "torch_loaded": "torch" in sys.modules,
    }
    write_json(a["json"], result)


def print_summary(result: RunResult, console) -> None:
    """The stage table and the results table (rich)."""
    from rich.table import Table

    from edgeprune.report import collect, summary_rows

    counts = {k: sum(s.status == k for s in result.stages) for k in ("computed", "cached")}
    t = Table("stage", "status", "seconds", title=f"stages: {counts['computed']} computed, "
              f"{counts['cached']} cached")
    for s in result.stages:
        t.add_row(s.name, s.status, f"{s.seconds:.1f}" if s.status == "computed" else "")
    console.print(t)
    header, rows = summary_rows(collect(result.run_dir))
    r = Table(*header, title="results (change vs the unpruned model in the same runtime)")
    for row in rows:
        r.add_row(*row)
    console.print(r)
