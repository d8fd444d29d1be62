"""The device commands `edgeprune devices`, `profile` and `ship` (registered by cli.py; edgeprune.devices does
the work)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgeprune.cli_app import JsonOpt, out, write_result
from edgeprune.cli_options import config_options
from edgeprune.config import option
from edgeprune.errors import EdgePruneError

DeviceOpt = Annotated[str, typer.Option("--device", help="device profile name (see `edgeprune devices`) or a .toml")]
ProfileFileOpt = Annotated[Path | None, typer.Option("--profile-file", help="a device profile TOML file (overrides "
                                                     "--device's lookup)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress on stderr")]


@dataclass
class ProfilerOverrides:
    """Profiler settings a command may override; None: the device profile's."""

    threads: str | None = option(None, "runtime threads, or 'auto' (default: the profile's)")
    prompt_lengths: list[int] | None = option(None, "prompt lengths for prefill/TTFT, comma-separated (default: "
                                              "the profile's)")
    new_tokens: int | None = option(None, "decode steps per repeat (default: the profile's)")
    repeats: int | None = option(None, "measured repeats; medians are reported (default: the profile's)")
    warmup: int | None = option(None, "warm-up runs before measuring (default: the profile's)")
    memory_budget_mb: str | None = option(None, "MiB or 'auto'; refuse artifacts that do not fit (default: the "
                                          "profile's memory_budget_mb)", flag="--memory-budget")
    decode_prompt: int | None = option(None, "prompt tokens before the decode steps (default: 128, or the longest "
                                       "prompt length if shorter)")


def devices(json_path: JsonOpt = None) -> None:
    """List the device profiles (shipped ones and yours in ~/.config/edgeprune/devices or $EDGEPRUNE_DEVICES)."""
    from edgeprune.devices import profiles

    t = Table("device", "threads", "budget MiB", "prefers", "GGUF runtime", "from", title="device profiles")
    data = {}
    for name, path in sorted(profiles.available().items()):
        p = profiles.load(name)
        data[name] = asdict(p)
        origin = "built-in" if path.parent == profiles.BUILTIN_DIR else str(path)
        t.add_row(name, str(p.threads), str(p.memory_budget_mb), f"{p.preferred_format} {p.preferred_dtype}",
                  p.gguf_backend, origin)
    out.print(t)
    write_result(json_path, data)


@config_options(overrides=ProfilerOverrides)
def profile_cmd(
    overrides: ProfilerOverrides,
    artifact: Annotated[Path, typer.Argument(help="an artifact directory from `edgeprune export`")],
    device: DeviceOpt = "cpu",
    profile_file: ProfileFileOpt = None,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Profile an ONNX/GGUF artifact on this machine with a device profile's settings: load time, prefill and TTFT
    per prompt length, decode tokens/s, per-token p50/p95, peak RSS (the torch-free device profiler)."""
    from edgeprune.devices import profiles, ship

    prof = profiles.load(device, profile_file)
    doc = ship.profile_local(artifact, prof, asdict(overrides), quiet=quiet)
    for line in ship.summary(doc):
        out.print(line, highlight=False, soft_wrap=True)
    write_result(json_path, doc)


@config_options(overrides=ProfilerOverrides)
def ship_cmd(
    overrides: ProfilerOverrides,
    artifact: Annotated[Path, typer.Argument(help="an artifact directory from `edgeprune export`")],
    device: DeviceOpt,
    host: Annotated[str | None, typer.Option(help="user@address (default: the profile's [ssh] host)")] = None,
    port: Annotated[int | None, typer.Option(help="SSH port (default: the profile's, else ssh's)")] = None,
    key: Annotated[str | None, typer.Option(help="SSH identity file (default: ssh's own / the agent)")] = None,
    known_hosts: Annotated[str | None, typer.Option("--known-hosts", help="known_hosts file to check the host "
                                                    "key against (default: ssh's)")] = None,
    connect_timeout: Annotated[int | None, typer.Option(help="seconds to wait for the connection")] = None,
    python: Annotated[str | None, typer.Option(help="python on the device (default: the profile's, python3)")] = None,
    remote_dir: Annotated[str | None, typer.Option(help="directory on the device (default: the profile's)")] = None,
    transport: Annotated[str, typer.Option(help="auto (rsync when both ends have it) | rsync | scp")] = "auto",
    bwlimit: Annotated[int | None, typer.Option(help="upload bandwidth limit, KiB/s")] = None,
    no_profile: Annotated[bool, typer.Option("--no-profile", help="copy and verify only")] = False,
    setup: Annotated[bool, typer.Option("--setup", help="first set the device up: install the runtimes for this "
                                        "artifact, offline, from wheels downloaded here for the device's platform, "
                                        "into DIR/env (venv, or a site directory); then use DIR/env/python")] = False,
    wheel: Annotated[list[Path] | None, typer.Option("--wheel", help="with --setup: a wheel built for the device to "
                                                     "install too (llama-cpp-python has none on PyPI); repeatable")
                     ] = None,
    timeout: Annotated[float, typer.Option(help="seconds the profiler may run on the device")] = 3600,
    profile_file: ProfileFileOpt = None,
    quiet: QuietOpt = False,
    json_path: JsonOpt = None,
) -> None:
    """Copy an artifact bundle (artifact, tokenizer, device code, sha256 manifest) to a device over SSH, verify it
    there, run the profiler there and bring the JSON back. Interrupted uploads resume on the next run."""
    from edgeprune.devices import profiles, ship, ssh
    from edgeprune.devices.remote import prepare

    prof = profiles.load(device, profile_file)
    remote = ssh.resolve_remote(prof, host, port, key, known_hosts, connect_timeout)
    if wheel and not setup:
        raise EdgePruneError("--wheel goes with --setup (it is installed on the device by the setup)")
    python = prepare(artifact, prof, remote, python, remote_dir, setup, wheel or [], quiet, transport)
    doc = ship.ship(artifact, prof, remote, python=python, remote_dir=remote_dir, transport=transport,
                    bwlimit=bwlimit, run_profile=not no_profile, timeout=timeout, quiet=quiet,
                    overrides=asdict(overrides))
    s = doc["ship"]
    out.print(f"bundle {s['bundle']} on {s['host']}: {len(s['uploaded'])} files uploaded, {len(s['reused'])} reused, "
              f"checksums verified", highlight=False, soft_wrap=True)
    if not no_profile:
        for line in ship.summary(doc):
            out.print(line, highlight=False, soft_wrap=True)
    write_result(json_path, doc)
