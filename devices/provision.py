"""Device setup over SSH (``edgeprune ship ARTIFACT --device NAME --host ... --setup [--wheel PATH]``): give a
device with nothing but Python 3 the device-side requirements, offline.

The device needs no internet: this host asks the device for its interpreter and platform (Python version,
machine, glibc), downloads the binary wheels for that platform with ``pip download --platform ...
--only-binary=:all:`` (cached in ``~/.cache/edgeprune/device-wheels/``), adds the wheels passed with ``--wheel``
(llama-cpp-python has no wheel on PyPI for aarch64 or x86-64: ship one built for the device, e.g. the one
``make device-sim`` cross-compiles, or the one ``make install`` builds here) and pip's own wheel, and uploads
them as a verified bundle (sha256 of every file, resumable, see ``ship.Shipper.transfer``). On the device, pip runs
from its wheel (``python pip-X.whl/pip install --no-index --find-links WHEELS``, so the device needs no pip):

* into a venv ``DIR/env/venv`` (``python -m venv --without-pip``) when the device can make one whose interpreter
  is the device's own (same machine and version);
* else into a site directory ``DIR/env/site`` (``pip install --target``): no ``venv`` module, or an interpreter
  that is a wrapper, as on the emulated device, whose venv would point at a program this host cannot run.

Either way ``DIR/env/python`` is the device's python from then on: a two-line launcher (the venv's python, or the
original interpreter with ``PYTHONPATH=DIR/env/site``). A second setup finds every module there and installs
nothing. Not done: system packages (Python itself must be there), GPU builds of the runtimes (pass their wheels
with ``--wheel``), removing an older environment.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

from edgeprune.devices import bundle, sim
from edgeprune.devices.ship import Shipper
from edgeprune.devices.ssh import Remote

from edgeprune.errors import EdgePruneError

REQUIREMENTS = {"gguf": ("numpy", "psutil", sim.LLAMA), "onnx": ("numpy", "psutil", "onnxruntime", "tokenizers")}
ENV_DIR = "env"
LAUNCHER = """#!/bin/sh
# edgeprune device environment ({mode}), written by `edgeprune ship --setup`
{line}
"""
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def wheel_cache() -> Path:
    return sim.cache_root().parent / "device-wheels"


def requirements_for(formats, pins: dict | None = None) -> list[str]:
    """Pinned requirement strings for the artifact formats (the versions installed here: same runtimes on both
    machines); llama-cpp-python stays unpinned, its wheel comes from ``--wheel``."""
    pins = pins or sim.pinned_versions()
    names = sorted({n for f in formats for n in REQUIREMENTS[f]})
    return [n if n == sim.LLAMA else f"{n}=={pins[n]}" for n in names]


def device_tags(probe: dict) -> list[str]:
    """pip ``--platform`` tags of the device (Linux with glibc only)."""
    if probe["system"] != "Linux" or probe["libc"] != "glibc" or not probe["libc_version"]:
        raise EdgePruneError(f"device setup supports Linux with glibc; the device runs {probe['system']} with "
                             f"{probe['libc'] or 'an unknown libc'}")
    minor = int(probe["libc_version"].split(".")[1])
    return sim.platform_tags(probe["machine"], minor)


def wheel_matches(path: Path, tags: list[str], python: str) -> bool:
    """Whether a wheel file's name says it installs on a device with these platform tags and Python."""
    m = _WHEEL.match(path.name)
    if not m:
        return False
    plats, cp = m["plat"].split("."), "cp" + python.replace(".", "")
    return (any(p in tags or p == "any" for p in plats)
            and any(py in ("py3", cp) or py.startswith("py3") for py in m["py"].split(".")))


def known_wheels() -> list[Path]:
    """llama-cpp-python wheels built on this machine: ``make install``'s and ``make device-sim``'s."""
    roots = [sim.cache_root().parent / "wheels", *sorted(sim.cache_root().glob("llama-*"))]
    return [w for r in roots if r.is_dir() for w in sorted(r.glob("llama_cpp_python-*.whl"))]


def pick_wheels(wheels: list[Path], probe: dict, tags: list[str], need_llama: bool) -> list[Path]:
    """The ``--wheel`` files (each must fit the device), plus a known llama-cpp-python wheel for the device
    when one is needed and none was given."""
    py = ".".join(probe["python"].split(".")[:2])
    out = []
    for w in map(Path, wheels):
        if not w.is_file():
            raise EdgePruneError(f"wheel not found: {w}")
        if not wheel_matches(w, tags, py):
            raise EdgePruneError(f"{w.name} does not install on the device ({probe['machine']}, Python {py}, "
                                 f"glibc {probe['libc_version']})")
        out.append(w)
    if need_llama and not any(w.name.startswith("llama_cpp_python-") for w in out):
        found = [w for w in known_wheels() if wheel_matches(w, tags, py)]
        if not found:
            hint = " (make device-sim cross-compiles one for aarch64)" if probe["machine"] == "aarch64" else ""
            raise EdgePruneError(f"no llama-cpp-python wheel for {probe['machine']} (PyPI has none): pass --wheel "
                                 f"PATH to one built for the device{hint}")
        out.append(found[-1])
    return out


def download(requirements: list[str], extra: list[Path], tags: list[str], python: str, log) -> list[Path]:
    """The wheels to install on the device, from the host-side cache (filled by ``pip download``)."""
    key = sim._digest({"reqs": requirements, "extra": sorted(w.name for w in extra), "tags": tags, "py": python})
    dest = wheel_cache() / key
    done = dest / "complete.json"
    if not done.is_file():
        log(f"downloading the device's wheels ({tags[0]}, Python {python}) into {dest}")
        reqs = [r for r in requirements if not r.startswith(sim.LLAMA)] + [str(w) for w in extra] + ["pip"]
        sim.download_wheels(dest, reqs, tags, python, log)
        done.write_text(json.dumps({"requirements": requirements, "extra": [str(w) for w in extra]}))
    return sorted(dest.glob("*.whl"))


def _launcher(mode: str, env_abs: str, base_python: str) -> str:
    if mode == "venv":
        line = f'exec {shlex.quote(env_abs + "/venv/bin/python")} "$@"'
    else:
        site = shlex.quote(env_abs + "/site")
        line = f'PYTHONPATH={site}"${{PYTHONPATH:+:$PYTHONPATH}}" exec {shlex.quote(base_python)} "$@"'
    return LAUNCHER.format(mode=mode, line=line)


def _try_venv(sh: Shipper, env_abs: str, probe: dict) -> bool:
    """Make ``ENV/venv`` and keep it only when its python is the device's own interpreter."""
    if not probe["venv"]:
        return False
    venv = f"{env_abs}/venv"
    check = "import platform,sys; print(platform.machine(), sys.version.split()[0])"
    cmd = (f"{shlex.join([sh.python, '-m', 'venv', '--without-pip', '--clear', venv])} >/dev/null 2>&1 && "
           f"{shlex.quote(venv + '/bin/python')} -c {shlex.quote(check)} 2>/dev/null || true")
    got = sh.run(cmd, "creating a venv").split()
    if got == [probe["machine"], probe["python"]]:
        return True
    sh.run(f"rm -rf {shlex.quote(venv)}", "removing the venv")
    sh.log(f"a venv on {sh.remote.label} would not run the device's interpreter ({' '.join(got) or 'it fails'}); "
           f"installing into a site directory instead")
    return False


def setup(remote: Remote, python: str, remote_dir: str, formats, wheels=(), transport: str = "auto",
          quiet: bool = False) -> dict:
    """Set the device up for ``formats`` ("gguf", "onnx"); returns {"python": the device's new python, ...}."""
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    sh = Shipper(remote, python, remote_dir, log)
    modules = sorted({m for f in formats for m in bundle.DEVICE_MODULES[f]})
    base = sh.agent("probe", {"modules": []})
    home = base["cwd"].rstrip("/")
    env_abs = sh.remote_dir if sh.remote_dir.startswith("/") else f"{home}/{sh.remote_dir}"
    env_abs += f"/{ENV_DIR}"
    launcher = f"{env_abs}/python"
    ready = _probe_launcher(remote, launcher, sh.remote_dir, modules, log)
    if ready is not None and all(v["found"] for v in ready["modules"].values()):
        log(f"{remote.label}: {launcher} already has {', '.join(modules)}")
        return {"python": launcher, "installed": [], "mode": "existing", "probe": ready,
                "seconds": round(time.perf_counter() - start, 2)}
    tags = device_tags(base)
    pyver = ".".join(base["python"].split(".")[:2])
    extra = pick_wheels(list(wheels), base, tags, "gguf" in formats)
    reqs = requirements_for(formats)
    files = download(reqs, extra, tags, pyver, log)
    pip_wheel = next((w for w in files if w.name.startswith("pip-")), None)
    with tempfile.TemporaryDirectory(prefix="edgeprune-wheels-") as tmp:
        sources = {f"wheels/{w.name}": w for w in files}
        manifest = bundle.build_manifest("wheels", sources, {"platform": tags[0], "python": pyver})
        (Path(tmp) / bundle.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        final = f"{sh.remote_dir}/{ENV_DIR}/wheels-{manifest['id'][:12]}"
        params = {"id": manifest["id"], "staging": final + bundle.PARTIAL_SUFFIX, "final": final,
                  "files": manifest["files"], "modules": []}
        status = sh.agent("status", params)
        uploaded, _, _ = sh.transfer(params, manifest, sources, Path(tmp) / bundle.MANIFEST, status,
                                     sh.pick_transport(transport, status), None)
    wheels_abs = (final if final.startswith("/") else f"{home}/{final}") + "/wheels"
    mode = "venv" if _try_venv(sh, env_abs, base) else "target"
    runner = f"{env_abs}/venv/bin/python" if mode == "venv" else sh.python
    names = [r.split("==")[0] for r in reqs]
    pip = [runner, f"{wheels_abs}/{pip_wheel.name}/pip", "install", "--no-index", "--find-links", wheels_abs,
           "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "-q"]
    pip += ["--target", f"{env_abs}/site", "--upgrade"] if mode == "target" else []
    log(f"installing {', '.join(names)} on {remote.label} ({mode}, offline, from {len(files)} wheels)")
    sh.run(shlex.join([*pip, *[r for r in reqs if not r.startswith(sim.LLAMA)],
                       *[f"{wheels_abs}/{w.name}" for w in extra]]), "pip install", timeout=3600,
           echo=None if quiet else f"[{remote.label}] ")
    script = _launcher(mode, env_abs, sh.python)
    sh.run(f"printf %s {shlex.quote(script)} > {shlex.quote(launcher)} && chmod 755 {shlex.quote(launcher)}",
           "writing the launcher")
    ready = _probe_launcher(remote, launcher, sh.remote_dir, modules, log)
    missing = [m for m, v in (ready or {"modules": {}})["modules"].items() if not v["found"]]
    if ready is None or missing:
        raise EdgePruneError(f"setup on {remote.label} finished but {launcher} lacks {', '.join(missing) or 'Python'}")
    log(f"{remote.label} is set up: --python {launcher}")
    return {"python": launcher, "mode": mode, "installed": names, "extra_wheels": [w.name for w in extra],
            "wheels_uploaded": len(uploaded), "wheels": len(files), "probe": ready,
            "seconds": round(time.perf_counter() - start, 2)}


def _probe_launcher(remote: Remote, launcher: str, remote_dir: str, modules: list[str], log) -> dict | None:
    """The probe through the launcher, or None when there is no launcher yet."""
    sh = Shipper(remote, "/bin/sh", remote_dir, log)
    if sh.run(f"test -x {shlex.quote(launcher)} && echo yes || echo no", "checking the launcher").strip() != "yes":
        return None
    sh.python = launcher
    return sh.agent("probe", {"modules": modules})
