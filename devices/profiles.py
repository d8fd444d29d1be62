"""Device profiles: one TOML file per target (runtimes, threads, memory budget, preferred format, where files go on
the device and how to reach it). Host side only (the device never reads them).

Where profiles come from, first match wins:

1. ``--profile-file PATH`` (or ``--device PATH.toml``): that file;
2. the directories in ``$EDGEPRUNE_DEVICES`` (separated by ``os.pathsep``);
3. ``$XDG_CONFIG_HOME/edgeprune/devices/`` (default ``~/.config/edgeprune/devices/``);
4. the profiles shipped with edgeprune (``devices/profiles/*.toml``).

A profile is found by its file name (``NAME.toml``); the ``name`` inside, if given, must match. Unknown keys are
errors, so a typo does not silently fall back to a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgeprune.errors import EdgePruneError
from edgeprune.io import read_toml

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"
FORMATS = ("gguf", "onnx")
_SCHEMA = {
    "": {"name", "description", "formats", "preferred_format", "preferred_dtype", "threads", "memory_budget_mb",
         "runtimes", "profile", "remote", "ssh"},
    "runtimes": {"gguf", "onnx"},
    "runtimes.gguf": {"backend", "n_gpu_layers"},
    "runtimes.onnx": {"providers"},
    "profile": {"prompt_lengths", "new_tokens", "warmup", "repeats"},
    "remote": {"python", "dir"},
    "ssh": {"host", "user", "port", "key", "known_hosts", "connect_timeout", "options"},
}


@dataclass
class SSHSettings:
    host: str | None = None  # "user@addr", "addr" or an alias from ~/.ssh/config
    user: str | None = None  # used when host has no "user@"
    port: int | None = None  # None: ssh's default (22 or ~/.ssh/config)
    key: str | None = None  # identity file; None: ssh's own identities
    known_hosts: str | None = None  # None: ssh's default files (host keys are always checked)
    connect_timeout: int = 10
    options: list[str] = field(default_factory=list)  # extra "-o" options, e.g. ["Compression=yes"]


@dataclass
class DeviceProfile:
    name: str
    description: str = ""
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    preferred_format: str = "gguf"
    preferred_dtype: str = "q8_0"
    threads: int | str = "auto"
    memory_budget_mb: float | str | None = "auto"
    gguf_backend: str = "llama.cpp CPU"
    n_gpu_layers: int = 0
    onnx_providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    prompt_lengths: list[int] = field(default_factory=lambda: [32, 128, 512])
    new_tokens: int = 64
    warmup: int = 1
    repeats: int = 5
    python: str = "python3"
    remote_dir: str = "edgeprune"
    ssh: SSHSettings = field(default_factory=SSHSettings)
    source: str = ""

    def profiler_args(self, fmt: str, **overrides) -> list[str]:
        """Command-line arguments of ``profiler.py`` for this device (``overrides``: None keeps the profile's)."""
        def get(key):
            return overrides[key] if overrides.get(key) is not None else getattr(self, key)

        args = ["--device", self.name, "--threads", str(get("threads")),
                "--prompt-lengths", ",".join(str(n) for n in get("prompt_lengths")),
                "--new-tokens", str(get("new_tokens")), "--warmup", str(get("warmup")),
                "--repeats", str(get("repeats"))]
        if overrides.get("decode_prompt"):
            args += ["--decode-prompt", str(overrides["decode_prompt"])]
        budget = get("memory_budget_mb")
        if budget is not None:
            args += ["--memory-budget", str(budget)]
        if fmt == "onnx":
            args += ["--providers", ",".join(self.onnx_providers)]
        elif self.n_gpu_layers:
            args += [f"--n-gpu-layers={self.n_gpu_layers}"]
        return args

    def check_format(self, fmt: str) -> None:
        if fmt not in self.formats:
            raise EdgePruneError(f"device '{self.name}' runs {', '.join(self.formats)} artifacts, not {fmt} "
                                 f"(formats in {self.source})")


def search_dirs() -> list[Path]:
    dirs = [Path(p).expanduser() for p in os.environ.get("EDGEPRUNE_DEVICES", "").split(os.pathsep) if p]
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [*dirs, config / "edgeprune" / "devices", BUILTIN_DIR]


def available() -> dict[str, Path]:
    """Every profile name that ``load`` finds, with the file it comes from (earlier directories win)."""
    found: dict[str, Path] = {}
    for d in search_dirs():
        if d.is_dir():
            for f in sorted(d.glob("*.toml")):
                found.setdefault(f.stem, f)
    return found


def _check_keys(data: dict, path: Path, section: str = "") -> None:
    allowed = _SCHEMA[section]
    for key, value in data.items():
        where = f"{section}.{key}" if section else key
        if key not in allowed:
            raise EdgePruneError(f"device profile {path}: unknown key '{where}' (allowed in "
                                 f"[{section or 'top level'}]: {', '.join(sorted(allowed))})")
        if where in _SCHEMA:
            if not isinstance(value, dict):
                raise EdgePruneError(f"device profile {path}: '{where}' must be a table")
            _check_keys(value, path, where)


def _int(value, what: str, path: Path, allow_auto: bool = False, minimum: int | None = None):
    if allow_auto and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        auto = ' or "auto"' if allow_auto else ""
        raise EdgePruneError(f"device profile {path}: {what} must be an integer{bound}{auto}, not {value!r}")
    return value


def parse(data: dict, path: Path, name: str | None = None) -> DeviceProfile:
    _check_keys(data, path)
    pname = data.get("name") or name or path.stem
    if name and data.get("name") and data["name"] != name:
        raise EdgePruneError(f"device profile {path} is named '{data['name']}', expected '{name}'")
    p = DeviceProfile(name=str(pname), description=str(data.get("description", "")), source=str(path))
    fmts = data.get("formats", list(FORMATS))
    if not isinstance(fmts, list) or not fmts or any(f not in FORMATS for f in fmts):
        raise EdgePruneError(f"device profile {path}: formats must be a list of {', '.join(FORMATS)}")
    p.formats = list(fmts)
    p.preferred_format = data.get("preferred_format", p.formats[0])
    if p.preferred_format not in FORMATS:
        raise EdgePruneError(f"device profile {path}: preferred_format must be one of {', '.join(FORMATS)}")
    p.preferred_dtype = str(data.get("preferred_dtype", p.preferred_dtype))
    p.threads = _int(data.get("threads", "auto"), "threads", path, allow_auto=True, minimum=1)
    budget = data.get("memory_budget_mb", "auto")
    if not (budget == "auto" or (isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0)):
        raise EdgePruneError(f"device profile {path}: memory_budget_mb must be a positive number or \"auto\"")
    p.memory_budget_mb = budget
    rt = data.get("runtimes", {})
    p.gguf_backend = str(rt.get("gguf", {}).get("backend", p.gguf_backend))
    p.n_gpu_layers = _int(rt.get("gguf", {}).get("n_gpu_layers", 0), "runtimes.gguf.n_gpu_layers", path, minimum=-1)
    providers = rt.get("onnx", {}).get("providers", p.onnx_providers)
    if not isinstance(providers, list) or not all(isinstance(x, str) and x for x in providers):
        raise EdgePruneError(f"device profile {path}: runtimes.onnx.providers must be a list of provider names")
    p.onnx_providers = providers
    prof = data.get("profile", {})
    lengths = prof.get("prompt_lengths", p.prompt_lengths)
    if not isinstance(lengths, list) or not lengths:
        raise EdgePruneError(f"device profile {path}: profile.prompt_lengths must be a list of integers")
    p.prompt_lengths = [_int(n, "profile.prompt_lengths", path, minimum=1) for n in lengths]
    p.new_tokens = _int(prof.get("new_tokens", p.new_tokens), "profile.new_tokens", path, minimum=1)
    p.warmup = _int(prof.get("warmup", p.warmup), "profile.warmup", path, minimum=0)
    p.repeats = _int(prof.get("repeats", p.repeats), "profile.repeats", path, minimum=1)
    remote = data.get("remote", {})
    p.python = str(remote.get("python", p.python)) or "python3"
    p.remote_dir = str(remote.get("dir", p.remote_dir)) or "edgeprune"
    s = data.get("ssh", {})
    options = s.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise EdgePruneError(f"device profile {path}: ssh.options must be a list of strings like \"Key=value\"")
    p.ssh = SSHSettings(host=s.get("host") or None, user=s.get("user") or None,
                        port=_int(s["port"], "ssh.port", path, minimum=1) if s.get("port") else None,
                        key=s.get("key") or None, known_hosts=s.get("known_hosts") or None,
                        connect_timeout=_int(s.get("connect_timeout", 10), "ssh.connect_timeout", path, minimum=1),
                        options=options)
    return p


def load(name_or_path: str | None = "cpu", profile_file: str | Path | None = None) -> DeviceProfile:
    """The profile ``name_or_path`` (a name, or a path to a .toml file); ``profile_file`` takes precedence."""
    if profile_file is not None:
        path = Path(profile_file).expanduser()
        if not path.is_file():
            raise EdgePruneError(f"device profile file not found: {path}")
        return parse(read_toml(path, "device profile"), path, None)
    name = name_or_path or "cpu"
    if name.endswith(".toml") or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise EdgePruneError(f"device profile file not found: {path}")
        return parse(read_toml(path, "device profile"), path, None)
    found = available()
    if name not in found:
        raise EdgePruneError(f"unknown device '{name}'; known: {', '.join(sorted(found))} (add NAME.toml to "
                             f"{search_dirs()[-2]} or pass --profile-file PATH)")
    return parse(read_toml(found[name], "device profile"), found[name], name)
