"""The functions the pipeline (and tests) call to measure on a remote device: who the device is, profile an
artifact there, and greedy tokens there for the cross-device parity check. Host side; every call goes over SSH
through ``ship.py`` (the system's OpenSSH, host keys checked) and optionally sets the device up first
(``provision.py``).

* ``connect(device, host, ...)`` -> (device profile, Remote): the profile's ``[ssh]`` settings, overridden.
* ``device_identity(profile, remote, python)`` -> dict: arch, emulated or not (and the evidence), CPU model,
  board, OS, Python, the versions of the device runtimes installed for that python and hostname as the device reports
  them, and ``key``: the fields that belong in a pipeline stage's cache key (a different machine, the same one
  emulated, or another runtime version must re-measure; the hostname and OS release are left out, so a re-imaged
  or renamed board of the same kind keeps its cached profiles).
* ``profile_on(artifact, device, host, ...)`` -> the profiler's JSON (``edgeprune.profile/1``) with ``ship`` and
  ``identity`` sections.
* ``greedy_on(artifact, device, host, ...)`` -> ``greedy.run``'s JSON from the device.

Not here: choosing artifacts or deciding what to re-measure (the pipeline's job).
"""

from __future__ import annotations

import json
import platform
import shlex
import socket
from pathlib import Path

from edgeprune.devices import bundle, emulation, greedy, machine, profiles, provision, ssh
from edgeprune.devices import ship as shipmod
from edgeprune.devices.profiles import DeviceProfile

from edgeprune.errors import EdgePruneError

# the device runtimes whose versions are part of a machine's identity (pip distribution names)
RUNTIMES = ("numpy", "psutil", "tokenizers", "onnxruntime", "onnxruntime-gpu", "llama-cpp-python")
IDENTITY = """import json, platform, socket
exec(compile({src!r}, "emulation.py", "exec"))
def runtimes(names):
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return {{}}
    out = {{}}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except Exception:
            pass
    return out
def first(path, key=None):
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if key is None:
                    return line.replace("\\0", "").strip() or None
                k, _, v = line.partition(":")
                if k.strip() == key:
                    return v.strip()
    except OSError:
        return None
print(json.dumps({{"arch": platform.machine(), "emulation": detect(), "hostname": socket.gethostname(),
                  "cpu_model": first("/proc/cpuinfo", "model name") or first("/proc/cpuinfo", "Model"),
                  "board": first("/proc/device-tree/model"), "system": platform.system(),
                  "release": platform.release(), "python": platform.python_version(),
                  "runtimes": runtimes({runtimes!r})}}))
"""
KEY_FIELDS = ("arch", "emulated", "cpu_model", "board", "python", "runtimes")


def connect(device: str | DeviceProfile, host: str | None = None, port: int | None = None, key: str | None = None,
            known_hosts: str | None = None) -> tuple[DeviceProfile, ssh.Remote]:
    prof = device if isinstance(device, DeviceProfile) else profiles.load(device)
    return prof, ssh.resolve_remote(prof, host, port, key, known_hosts)


def _identity(doc: dict, host: str | None) -> dict:
    emu = doc["emulation"]
    doc = {**doc, "host": host, "emulated": emu["emulated"]}
    doc["key"] = {k: doc.get(k) for k in KEY_FIELDS} | {"host": host}
    return doc


def local_identity() -> dict:
    """This machine's identity, in the same form (what a pipeline profiling here keys on)."""
    cpu = machine.cpu_model()
    return _identity({"arch": platform.machine(), "emulation": emulation.detect(), "hostname": socket.gethostname(),
                      "cpu_model": cpu, "board": None, "system": platform.system(), "release": platform.release(),
                      "python": platform.python_version(), "runtimes": _runtime_versions()}, None)


def _runtime_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in RUNTIMES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_identity(profile: DeviceProfile, remote: ssh.Remote, python: str | None = None) -> dict:
    """Ask the device who it is (one SSH round trip; the standard library only, so it works before setup)."""
    sh = shipmod.Shipper(remote, python or profile.python, profile.remote_dir, log=lambda m: None)
    src = (shipmod.DEVICE_DIR / "emulation.py").read_text().split('\nif __name__ == "__main__":')[0]
    out = sh.run([sh.python, "-c", IDENTITY.format(src=src, runtimes=RUNTIMES)], "identifying the device")
    try:
        doc = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EdgePruneError(f"{remote.label} did not say who it is: {out[-200:]!r}") from None
    return _identity(doc, remote.label)


def prepare(artifact, profile: DeviceProfile, remote, python, remote_dir, setup: bool, wheels=(), quiet=True,
            transport: str = "auto") -> str:
    """The device's python, after setting the device up for this artifact's format when asked (``--setup``)."""
    python = python or profile.python
    if setup:
        fmt, _ = shipmod.artifact_format(Path(artifact))
        python = provision.setup(remote, python, remote_dir or profile.remote_dir, [fmt], wheels,
                                 transport=transport, quiet=quiet)["python"]
    return python


def profile_on(artifact, device: str | DeviceProfile, host: str | None = None, *, port: int | None = None,
               key: str | None = None, known_hosts: str | None = None, python: str | None = None,
               remote_dir: str | None = None, overrides: dict | None = None, setup: bool = False, wheels=(),
               timeout: float = 3600, quiet: bool = True) -> dict:
    """Ship ``artifact`` to the device, profile it there; the profile JSON with ``ship`` and ``identity``."""
    prof, remote = connect(device, host, port, key, known_hosts)
    python = prepare(artifact, prof, remote, python, remote_dir, setup, wheels, quiet)
    doc = shipmod.ship(artifact, prof, remote, python=python, remote_dir=remote_dir, overrides=overrides,
                       timeout=timeout, quiet=quiet)
    doc["identity"] = device_identity(prof, remote, python)
    return doc


def greedy_on(artifact, device: str | DeviceProfile, host: str | None = None, *, port: int | None = None,
              key: str | None = None, known_hosts: str | None = None, python: str | None = None,
              remote_dir: str | None = None, tokens: int = 32, prompt: str = greedy.PROMPT, threads: int = 1,
              setup: bool = False, wheels=(), timeout: float = 1800, quiet: bool = True) -> dict:
    """Ship ``artifact`` (checksums verified there) and run ``greedy.py`` on it on the device."""
    prof, remote = connect(device, host, port, key, known_hosts)
    python = prepare(artifact, prof, remote, python, remote_dir, setup, wheels, quiet)
    doc = shipmod.ship(artifact, prof, remote, python=python, remote_dir=remote_dir, run_profile=False,
                       quiet=quiet)
    s = doc["ship"]
    sh = shipmod.Shipper(remote, python, remote_dir or prof.remote_dir, log=lambda m: None)
    args = [python, "-B", f"{bundle.CODE_DIR}/greedy.py", bundle.ARTIFACT_DIR, "--tokens", str(tokens),
            "--prompt", prompt, "--threads", str(threads)]
    out = sh.run(f"cd {shlex.quote(s['bundle'])} && {shlex.join(args)}", "greedy generation", timeout=timeout)
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EdgePruneError(f"greedy.py on {remote.label} printed no JSON: {out[-200:]!r}") from None
    result["ship"] = s
    return result


def measured_on(doc: dict) -> dict:
    """Which machine measured a profile JSON (local or shipped): what a pipeline stage result carries and the
    report prints next to the timings."""
    m = doc.get("machine") or {}
    return {"host": (doc.get("ship") or {}).get("host"), "arch": doc.get("arch") or m.get("arch"),
            "emulated": bool(doc.get("emulated", m.get("emulated"))), "cpu_model": m.get("cpu_model"),
            "board": m.get("board"), "device_profile": doc.get("device")}
