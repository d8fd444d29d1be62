"""The configuration of `edgeprune run`: typed sections, read from TOML, overridden with ``--set`` and the
direct options, written back to ``RUN_DIR/config.toml``.

``[prune]`` is ``edgeprune.config.PruneConfig`` itself and ``[data]`` is ``DataSpec`` (the fields and defaults of
`edgeprune prune`); ``[run]`` adds the model, the run directory and ``ModelLoad``'s device and dtype; ``[fit]``
holds `edgeprune fit`'s targets (when one is set, fit chooses the ratio). Unknown
sections and keys are one-line errors, as are values of the wrong type. Importing this module is cheap.
Not here: running anything (plan.py, engine.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgeprune.config import DEVICE, DataSpec, ModelLoad, PruneConfig, coerce, default_of, field_types, option
from edgeprune.errors import EdgePruneError
from edgeprune.io import read_toml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class RunSection(ModelLoad):
    model: str = option("default", "model to prune: default, a HF directory, a .gguf, a hub id")
    out: str = option("out/run", "the run directory")


@dataclass
class EvaluateSection:
    seq_len: int = option(128, "PPL window length")
    max_tokens: int = option(8192, "evaluation tokens (0: the whole text)")
    batch_size: int = option(8, "windows per forward pass")
    tasks: list[str] = option([], "zero-shot tasks (piqa, arc_easy, arc_challenge, boolq, openbookqa)")
    tasks_dir: str = option("", "directory with the task files ('' = $EDGEPRUNE_TASKS_DIR)")
    limit: int = option(0, "first N examples per task; 0: all")
    artifacts: bool = option(True, "PPL of every exported artifact in its runtime")
    threads: int = option(0, "runtime threads for the artifacts' PPL (0: the runtime's choice; not in any key)")

    def validate(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1 or min(self.max_tokens, self.limit, self.threads) < 0:
            raise EdgePruneError("evaluate.seq_len must be at least 2, batch_size at least 1, max_tokens and "
                                 "limit at least 0")


@dataclass
class ExportSection:
    artifacts: list[str] = option(["gguf:q8_0", "onnx:int8"], "FORMAT:DTYPE, each for both models")
    optimize: bool = option(False, "ONNX: onnxruntime's transformer optimizer")

    def targets(self) -> list[tuple[str, str]]:
        """The (format, dtype) pairs, validated."""
        from edgeprune.export.artifacts import DTYPES, FORMATS

        targets = []
        for item in self.artifacts:
            fmt, sep, dtype = str(item).partition(":")
            dtype = {"f32": "fp32", "f16": "fp16"}.get(dtype, dtype)  # GGUF's names for the float types
            if not sep or fmt not in FORMATS or dtype not in DTYPES:
                raise EdgePruneError(f"export.artifacts: {item!r} is not FORMAT:DTYPE (formats "
                                     f"{', '.join(FORMATS)}; dtypes {', '.join(DTYPES)})")
            if fmt == "onnx" and DTYPES[dtype][0] is None:
                raise EdgePruneError(f"export.artifacts: {item!r}: {dtype} is a GGUF type; ONNX takes fp32, fp16, "
                                     "int8")
            if (fmt, dtype) not in targets:
                targets.append((fmt, dtype))
        return targets


@dataclass
class ProfileSection:
    enabled: bool = option(True, "profile each artifact")
    device: str = option("cpu", "device profile (see `edgeprune devices`)")
    prompt_tokens: int = option(64, "TTFT prompt length")
    new_tokens: int = option(32, "decode steps")
    repeats: int = option(3, "measured repeats (medians)")
    threads: int = option(0, "runtime threads (0: the runtime's choice)")
    args: list[str] = option([], "extra arguments for `edgeprune profile` (`edgeprune ship` with a host)")
    # a device over SSH (edgeprune/pipeline/profiling.py says why these are flat keys); '' / 0: the device
    # profile's [ssh] / [remote] settings; no host anywhere: profile on this machine
    host: str = option("", "user@address: ship and profile there ('' = the device profile's [ssh] host, if any)")
    port: int = option(0, "SSH port (0: the device profile's, else ssh's)")
    key: str = option("", "SSH identity file ('' = the device profile's, else ssh's own / the agent)")
    known_hosts: str = option("", "known_hosts file for the host key check ('' = the device profile's, else ssh's)")
    python: str = option("", "python on the device ('' = the device profile's [remote] python)")
    remote_dir: str = option("", "directory on the device ('' = the device profile's [remote] dir)")

    def validate(self) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.repeats < 1 or self.threads < 0:
            raise EdgePruneError("profile.prompt_tokens and repeats must be at least 1, new_tokens at least 2")
        if not 0 <= self.port < 65536:
            raise EdgePruneError(f"profile.port must be 0 (the default) or a TCP port, not {self.port}")


@dataclass
class ReportSection:
    ablation: str = option("bench/results/ablation.json", "ablation table to include when present ('' = none)")


FIT_TARGETS = ("max_memory_mb", "min_decode_tok_s", "max_ttft_ms", "max_size_mb", "max_ppl_ratio")


@dataclass
class FitSection:
    """`edgeprune fit` as a stage of the run: when any target is set, the pruning ratio (and dtype) is chosen
    to meet them and ``prune.ratio`` is ignored. 0 / '' / []: not set."""

    max_memory_mb: float = option(0.0, "peak RSS target, MiB")
    min_decode_tok_s: float = option(0.0, "decode speed target, tokens/s")
    max_ttft_ms: float = option(0.0, "time to first token target, ms (with prompt_tokens)")
    prompt_tokens: int = option(0, "prompt length of max_ttft_ms")
    max_size_mb: float = option(0.0, "artifact size target, MiB")
    max_ppl_ratio: float = option(0.0, "quality target: PPL / dense PPL")
    device: str = option("", "device profile to fit to ('': profile.device)")
    host: str = option("", "profile over SSH on this host (user@address; '': here)")
    format: str = option("", "gguf | onnx ('': the device profile's)")
    dtypes: list[str] = option([], "dtypes to search ([]: q8_0, q4_k_m for GGUF; int8 for ONNX)")
    budget: str = option("params", "what LSPS spends: params, or latency (the device's decode time)")
    threads: str = option("", "runtime threads, or 'auto' ('': profile.threads, else the device profile's)")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, t) for t in FIT_TARGETS)

    def validate(self) -> None:
        if any(getattr(self, t) < 0 for t in (*FIT_TARGETS, "prompt_tokens")):
            raise EdgePruneError("fit targets must be positive (0: not set)")
        if not self.enabled and section_dict(self) != section_dict(FitSection()):
            raise EdgePruneError(f"[fit] sets no target (set at least one of {', '.join(FIT_TARGETS)})")
        if self.budget not in ("params", "latency"):
            raise EdgePruneError(f"fit.budget is 'params' or 'latency', not '{self.budget}'")
        if self.format not in ("", "gguf", "onnx"):
            raise EdgePruneError(f"fit.format is 'gguf' or 'onnx', not '{self.format}'")

    def targets(self):
        """The targets as ``edgeprune.fit.search.Targets`` (unset ones None)."""
        from edgeprune.fit.search import Targets

        return Targets(**{t: getattr(self, t) or None for t in (*FIT_TARGETS, "prompt_tokens")})


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSpec = field(default_factory=DataSpec)
    prune: PruneConfig = field(default_factory=PruneConfig)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    export: ExportSection = field(default_factory=ExportSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    report: ReportSection = field(default_factory=ReportSection)
    fit: FitSection = field(default_factory=FitSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: section_dict(getattr(self, f.name)) for f in fields(self)}


SECTIONS: dict[str, type] = {f.name: field_types(RunConfig)[f.name] for f in fields(RunConfig)}


def config_fields(cls) -> dict[str, Any]:
    """The fields a config file may set (the Python-API-only ones, like ``scorer_options``, are not among them)."""
    return {f.name: f for f in fields(cls) if f.metadata.get("cli", True)}


def section_dict(section) -> dict[str, Any]:
    return {name: getattr(section, name) for name in config_fields(type(section))}


def defaults() -> dict[str, dict[str, Any]]:
    return {name: {k: default_of(f) for k, f in config_fields(cls).items()} for name, cls in SECTIONS.items()}


def _toml_value(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib  # type: ignore[no-redef]
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


def _merge(raw: dict, data: dict, origin: str) -> None:
    for section, values in data.items():
        if section not in SECTIONS:
            raise EdgePruneError(f"{origin}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise EdgePruneError(f"{origin}: [{section}] must be a table")
        known = config_fields(SECTIONS[section])
        types_ = field_types(SECTIONS[section])
        for key, value in values.items():
            if key not in known:
                raise EdgePruneError(f"{origin}: unknown key {section}.{key} (known: {', '.join(known)})")
            raw[section][key] = coerce(types_[key], value, f"{section}.{key}")


def parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` (the value in TOML syntax; a bare word is a string)."""
    if "=" not in item:
        raise EdgePruneError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
    name, _, raw = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not dot or not key:
        raise EdgePruneError(f"--set takes SECTION.KEY=VALUE, got {item!r}")
    return section, key, _toml_value(raw.strip())


def _direct(name: str, value: Any) -> dict:
    """Where a direct option (`edgeprune run --model/--out/--ratio/--device/--dtype`) goes. ``--device`` keeps
    its first meaning, the device profile, for every name that is not a torch device; cuda/cuda:N/auto set the
    torch device, and cpu (both a torch device and a profile) sets both."""
    value = str(value) if isinstance(value, Path) else value
    if name == "device":
        if not DEVICE.match(value):
            return {"profile": {"device": value}}
        return {"run": {"device": value}, **({"profile": {"device": value}} if value == "cpu" else {})}
    if name == "ratio":
        return {"prune": {"ratio": value}}
    return {"run": {name: value}}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                **direct: Any) -> RunConfig:
    """The defaults, then the config file, then ``--set`` overrides, then direct options (``model``, ``out``,
    ``ratio``, ``device``, ``dtype``; None = not given)."""
    raw: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    cfg_path = resolve_config_path(path)
    _merge(raw, read_toml(cfg_path, "config"), str(cfg_path))
    for item in overrides:
        section, key, value = parse_override(item)
        _merge(raw, {section: {key: value}}, "--set")
    for name, value in direct.items():
        if value is not None:
            _merge(raw, _direct(name, value), f"--{name}")
    return RunConfig(**{name: cls(**raw[name]) for name, cls in SECTIONS.items()})


def dump_toml(cfg: RunConfig) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
