"""How the pipeline profiles an artifact, and on which machine.

``Target`` is where the profile stages measure: this machine (`edgeprune profile`, the torch-free device profiler,
in a separate process, so that peak RSS is the runtime's and not this torch-sized process's), or a device over SSH
(`edgeprune ship`: bundle, checksums verified there, the profiler run there, the JSON brought back; the same
command line as `edgeprune ship`, so ``profile.args`` mean the same in both places). A device is used when
``profile.host`` is set (`--set profile.host=pi@raspberrypi.local`, `make demo DEVICE=rpi5 HOST=...`) or else when
the device profile names one (its ``[ssh] host``).

Why flat ``[profile]`` keys (host, port, key, known_hosts, python, remote_dir) and not an ``[ssh]`` table in the
run config: every run-config key is one `--set SECTION.KEY=VALUE` (the CLI names the issue fixed are
``profile.host`` and ``make demo ... HOST=``), sections are flat dataclasses shared with the CLI, and the device
profile already has its ``[ssh]`` table for what stays the same from run to run (user, port, key, options): the
run config only overrides it, as `edgeprune ship --host/--port/...` does. No ``--setup`` here: setting a device up
installs software on it, which a cached pipeline stage should not do behind the user's back; run `edgeprune ship
--setup` once and point ``profile.python`` at ``DIR/env/python``.

The machine is part of every profile stage's key: ``Target.identity()`` asks it once per run (one SSH round trip,
or this machine's own answer) for arch, emulated or not, CPU model, board, Python and the runtime versions
(edgeprune.devices.remote), so the same artifact profiled on another machine, or emulated, is another stage. How
to reach it (port, key files, directories) is not in the key; the host is.

Also here: the summary the report reads from an ``edgeprune.profile/1`` document. Not here: the measurement itself
(devices/profiler.py) or the transfer (devices/ship.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgeprune.errors import EdgePruneError

PROFILER = "cli"  # part of every profile stage's key (the value earlier run directories were keyed with)
CONNECTION = ("host", "port", "key", "known_hosts", "python", "remote_dir")  # how to reach it: not in any key


class Target:
    """The machine the profile stages measure on: this one, or the device at ``host`` (see the module doc)."""

    def __init__(self, prof):
        from edgeprune.devices import profiles

        self.prof = prof
        self.device = profiles.load(prof.device)  # an unknown device profile fails here, before any work
        self.host = prof.host or self.device.ssh.host or None
        self.remote = None
        if self.host:
            from edgeprune.devices import ssh

            self.remote = ssh.resolve_remote(self.device, self.host, prof.port or None, prof.key or None,
                                             prof.known_hosts or None)
        self._identity: dict | None = None

    @property
    def label(self) -> str:
        return self.remote.label if self.remote else "this machine"

    def identity(self) -> dict:
        """edgeprune.devices.remote's identity of the measuring machine (asked once)."""
        if self._identity is None:
            from edgeprune.devices import remote

            if self.remote is None:
                self._identity = remote.local_identity()
            else:
                try:
                    self._identity = remote.device_identity(self.device, self.remote, self.prof.python or None)
                except EdgePruneError as e:
                    raise EdgePruneError(f"cannot identify the profiling device ({e}); profile stages are keyed by "
                                         "the machine that measures them: make the device reachable, or set "
                                         "profile.enabled=false") from None
        return self._identity

    def command(self, art: Path, json_path: Path) -> list[str]:
        """`edgeprune profile ART` here or `edgeprune ship ART --host ...` there, with the [profile] section's
        settings; ``prof.args`` are passed last and win."""
        prof = self.prof
        extra = [str(a) for a in prof.args]
        settings = {"--prompt-lengths": str(prof.prompt_tokens), "--new-tokens": str(prof.new_tokens),
                    "--decode-prompt": str(prof.prompt_tokens), "--repeats": str(prof.repeats),
                    "--threads": str(prof.threads) if prof.threads else None}
        if self.remote is not None:
            r = self.remote
            settings = {"--host": r.host, "--port": str(r.port) if r.port else None, "--key": r.key,
                        "--known-hosts": r.known_hosts, "--python": prof.python or None,
                        "--remote-dir": prof.remote_dir or None, **settings}
        cmd = [sys.executable, "-m", "edgeprune", "ship" if self.remote else "profile", str(art), "--device",
               prof.device, "--json", str(json_path)]
        for opt, value in settings.items():
            if value is not None and opt not in extra:
                cmd += [opt, value]
        if "--quiet" not in extra:
            cmd.append("--quiet")
        return cmd + extra

    def profile(self, art: Path, json_path: Path) -> dict:
        """Profile ``art`` on the target; its JSON document, checked to come from the identified machine."""
        from edgeprune.devices.remote import measured_on

        raw = _run(self.command(art, json_path), art, json_path, self.label)
        ident, m = self.identity(), measured_on(raw)
        if (m["arch"], m["emulated"]) != (ident["arch"], ident["emulated"]):
            raise EdgePruneError(f"{self.label} was identified as {ident['arch']} (emulated: {ident['emulated']}) but "
                                 f"the profile says {m['arch']} (emulated: {m['emulated']})")
        return raw


def _run(cmd: list[str], art: Path, json_path: Path, where: str) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr or p.stdout or "").strip().splitlines() if ln.strip()]
        last = lines[-1].removeprefix("error: ") if lines else f"exit code {p.returncode}"
        raise EdgePruneError(f"profiling {art} on {where} failed: {last}")
    try:
        return json.loads(json_path.read_text())
    except (OSError, ValueError):
        raise EdgePruneError(f"the profiler wrote no JSON for {art}") from None


def summarize_profile(raw: dict, prompt_tokens: int) -> dict:
    """TTFT (ms) of the prefill row with ``prompt_tokens``, decode tokens/s and peak RSS (MiB) from an
    ``edgeprune.profile/1`` document."""
    if not str(raw.get("schema", "")).startswith("edgeprune.profile/"):
        raise EdgePruneError(f"the profiler wrote an unknown document (schema {raw.get('schema')!r})")
    rows = raw.get("prefill") or []
    row = next((r for r in rows if r.get("prompt_tokens") == prompt_tokens), rows[0] if rows else {})
    return {"ttft_ms": row.get("ttft_ms"), "ttft_prompt_tokens": row.get("prompt_tokens"),
            "prefill_ms": row.get("prefill_ms"), "decode_tokens_per_s": (raw.get("decode") or {}).get("tokens_per_s"),
            "peak_rss_mib": (raw.get("memory") or {}).get("peak_rss_mb"), "load_s": raw.get("load_s")}
