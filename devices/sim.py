"""An emulated aarch64 "device" on an x86-64 Linux host, built from Debian's and PyPI's packages only, so that the
device side (bundle, profiler, onnxruntime, llama.cpp) can be shipped to and run on aarch64 without the hardware.

What it is: a Debian bookworm arm64 root filesystem (Python 3.11, as Raspberry Pi OS) unpacked from Debian's .debs
(``debootstrap --foreign`` downloads and resolves them; every .deb is then unpacked with ``dpkg -x``: the second
stage cannot run without binfmt_misc, and nothing here needs the maintainer scripts), PyPI's aarch64 wheels of the
device requirements (numpy, psutil, onnxruntime, tokenizers) and a llama-cpp-python wheel cross-compiled with
Debian's ``aarch64-linux-gnu`` GCC (PyPI has no aarch64 wheel). Programs run through ``qemu-aarch64-static -L
ROOTFS`` invoked explicitly (binfmt_misc is not mounted here). Two wrappers are the device's python:

* ``bin/python``: the aarch64 interpreter with the device requirements on its path (ship and profile).
* ``bin/python-bare``: the same interpreter with nothing installed (``edgeprune ship --setup`` starts from it).

Everything lives under ``~/.cache/edgeprune/aarch64/`` (``$XDG_CACHE_HOME``, or ``$EDGEPRUNE_CACHE``), keyed by
the versions that go into it, and is built once per machine: ``make device-sim`` or
``python -m edgeprune.devices.sim build``; ``... sim status`` prints the build record (``sim.json``: versions,
seconds per step, load average). It needs root (debootstrap), ``qemu-user-static``, ``debootstrap``,
``g++-aarch64-linux-gnu`` and ``cmake`` (``make device-sim`` installs them with apt-get) and the network for the
.debs, the wheels and llama-cpp-python's source.

What it is not: a Raspberry Pi. qemu translates aarch64 instructions to x86 ones, so its timings say nothing about
a device (the profiler detects emulation and labels them, see ``emulation.py``); it shows that the code, the
wheels and the artifacts work on aarch64 and give the same answers there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgeprune.errors import EdgePruneError

SUITE = "bookworm"
PYTHON = "3.11"
GLIBC_MINOR = 36  # bookworm's glibc 2.36: the newest manylinux tag the device takes
DEB_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6")
REQUIREMENTS = ("numpy", "psutil", "onnxruntime", "tokenizers")
LLAMA = "llama-cpp-python"
# -march of the cross-built llama.cpp: Cortex-A76 (Raspberry Pi 5) and Cortex-A78AE (Jetson Orin) have the
# dot-product and fp16 instructions; a Raspberry Pi 4 (Cortex-A72, armv8-a) would need ARM_ARCH=armv8-a.
ARM_ARCH = os.environ.get("EDGEPRUNE_ARM_ARCH", "armv8.2-a+dotprod+fp16")
# llama.cpp options for the device wheel: no -march=native (cross build), ggml's own thread pool instead of
# OpenMP (one library fewer to need on the device), no multimodal library (the device never loads it)
LLAMA_CMAKE = ("-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={ARM_ARCH}", "-DGGML_OPENMP=OFF", "-DLLAVA_BUILD=OFF")
RECIPE = 1  # bump when the build steps change: part of every cache key
FALLBACK_PINS = {"numpy": "2.4.6", "psutil": "7.2.2", "onnxruntime": "1.32.0", "tokenizers": "0.23.3",
                 LLAMA: "0.3.36"}
TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap", "dpkg": "dpkg",
         "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
         "cmake": "cmake"}
TOOLCHAIN = """set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
"""
WRAPPER = """#!/bin/sh
# The python of edgeprune's emulated aarch64 device: Debian {suite}'s arm64 python{py} under qemu-user, started
# explicitly (no binfmt_misc). Built by `make device-sim` ({module}); timings under it are not device timings.
export EDGEPRUNE_EMULATOR=qemu-aarch64-static
{pythonpath}export PYTHONNOUSERSITE=1
unset PYTHONHOME
exec {qemu} -L {rootfs} {rootfs}/usr/bin/python{py} "$@"
"""


def cache_root() -> Path:
    base = os.environ.get("EDGEPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgeprune")
    return Path(base) / "aarch64"


def pinned_versions() -> dict[str, str]:
    """The device requirements at the versions installed here (same runtime versions on both machines, so that
    a difference in answers is the architecture's, not a version's); FALLBACK_PINS where one is missing."""
    from importlib import metadata

    out = {}
    for dist in (*REQUIREMENTS, LLAMA):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = FALLBACK_PINS[dist]
    return out


def platform_tags(arch: str = "aarch64", glibc_minor: int = GLIBC_MINOR) -> list[str]:
    """pip ``--platform`` values a Linux device with this glibc takes, newest first (pip does not expand
    manylinux_2_X itself)."""
    return ([f"manylinux_2_{m}_{arch}" for m in range(glibc_minor, 16, -1)]
            + [f"manylinux2014_{arch}", f"linux_{arch}"])


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Sim:
    """A built emulated device (its directory holds ``sim.json``, ``site/`` and the wrappers in ``bin/``)."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def bare_python(self) -> Path:
        return self.root / "bin" / "python-bare"

    @property
    def record(self) -> dict:
        return json.loads((self.root / "sim.json").read_text())

    @property
    def rootfs(self) -> Path:
        return Path(self.record["rootfs"])

    @property
    def wheelhouse(self) -> Path:
        """The aarch64 wheels the device requirements came from (and the cross-built llama-cpp-python)."""
        return Path(self.record["wheelhouse"])

    @property
    def llama_wheel(self) -> Path:
        return Path(self.record["llama_wheel"])


def sim_key(versions: dict | None = None) -> str:
    return _digest({"recipe": RECIPE, "suite": SUITE, "python": PYTHON, "debs": DEB_PACKAGES, "arch": ARM_ARCH,
                    "cmake": LLAMA_CMAKE, "versions": versions or pinned_versions()})


def find(versions: dict | None = None) -> Sim | None:
    """The emulated device built for these versions (default: the ones installed here), or None."""
    root = cache_root() / f"sim-{sim_key(versions)}"
    if (root / "sim.json").is_file() and os.access(root / "bin" / "python", os.X_OK):
        sim = Sim(root)
        if sim.rootfs.is_dir() and shutil.which("qemu-aarch64-static"):
            return sim
    return None


def missing_tools() -> list[str]:
    return [f"{tool} (apt-get install {pkg})" for tool, pkg in TOOLS.items() if not shutil.which(tool)]


def unavailable_reason() -> str | None:
    """Why tests cannot use the emulated device (None: they can)."""
    if sys.platform != "linux":
        return "the emulated aarch64 device needs Linux (qemu-user)"
    if not shutil.which("qemu-aarch64-static"):
        return "qemu-aarch64-static is not installed (`make device-sim` installs Debian's qemu-user-static)"
    if find() is None:
        return f"the emulated aarch64 device is not built for these versions: run `make device-sim` (cache: " \
               f"{cache_root()})"
    return None


# ---- build steps ------------------------------------------------------------------------------------------
def _run(cmd: list[str], what: str, log, env: dict | None = None, cwd: Path | None = None) -> str:
    log(f"  $ {' '.join(str(c) for c in cmd)[:200]}")
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd)
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        raise EdgePruneError(f"{what} failed (exit {p.returncode}):\n{tail}")
    return p.stdout


def debian_mirror(suite: str = SUITE) -> str:
    """The Debian mirror this host's apt uses for ``suite`` (``$EDGEPRUNE_DEBIAN_MIRROR`` overrides it)."""
    if os.environ.get("EDGEPRUNE_DEBIAN_MIRROR"):
        return os.environ["EDGEPRUNE_DEBIAN_MIRROR"]
    texts = [p.read_text(errors="replace") for p in [Path("/etc/apt/sources.list"),
                                                      *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
             if p.is_file() and p.suffix in (".list", ".sources", "")]
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):  # deb822 (.sources)
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and suite in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s", text, re.M):  # one-line format
            if m.group(2) == suite:
                return m.group(1)
    raise EdgePruneError(f"no Debian {suite} mirror in /etc/apt/sources.list*: set EDGEPRUNE_DEBIAN_MIRROR=URL")


def build_rootfs(dest: Path, log) -> None:
    """arm64 Debian with python3.11: debootstrap's first stage, then every downloaded .deb unpacked."""
    if os.geteuid() != 0:
        raise EdgePruneError("building the aarch64 root filesystem needs root (debootstrap)")
    tmp = dest.with_name(dest.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--include={','.join(DEB_PACKAGES)}",
          SUITE, tmp, debian_mirror()], "debootstrap (arm64 first stage)", log)
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    for deb in debs:
        _run(["dpkg", "-x", deb, tmp], f"unpacking {deb.name}", lambda m: None)
        deb.unlink()
    if not (tmp / f"usr/bin/python{PYTHON}").is_file():
        raise EdgePruneError(f"the arm64 root filesystem has no python{PYTHON} after unpacking {len(debs)} .debs")
    tmp.rename(dest)


def download_wheels(dest: Path, requirements: list[str], tags: list[str], python_version: str, log,
                    find_links: list[Path] = ()) -> None:
    """``pip download`` the binary wheels of ``requirements`` (and their dependencies) for another platform."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", python_version,
           "--implementation", "cp", "-d", dest, *[x for t in tags for x in ("--platform", t)],
           *[x for d in find_links for x in ("--find-links", d)], *requirements]
    _run(cmd, "pip download (device wheels)", log)


def _elf_machine(data: bytes) -> int | None:
    return int.from_bytes(data[18:20], "little") if data[:4] == b"\x7fELF" else None


def check_wheel_arch(wheel: Path, machine: int = 183) -> list[str]:
    """Shared libraries in ``wheel``; raises unless every one is built for ELF ``machine`` (183: aarch64)."""
    libs = []
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if ".so" in Path(name).name:
                with z.open(name) as f:
                    m = _elf_machine(f.read(20))
                if m is not None and m != machine:
                    raise EdgePruneError(f"{wheel.name}: {name} is built for ELF machine {m}, not {machine}")
                libs.append(name)
    if not libs:
        raise EdgePruneError(f"{wheel.name} has no shared library")
    return libs


def cross_build_llama(dest: Path, version: str, jobs: int, log) -> Path:
    """Cross-compile llama-cpp-python ``version`` from its PyPI sdist for aarch64 with Debian's GCC cross
    compiler; returns the wheel (tagged linux_aarch64 through ``_PYTHON_HOST_PLATFORM``, which sysconfig, and so
    the wheel's tag, follows)."""
    dest.mkdir(parents=True, exist_ok=True)
    done = sorted(dest.glob("llama_cpp_python-*-linux_aarch64.whl"))
    if done:
        return done[0]
    work = dest / f"build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (work / "toolchain.cmake").write_text(TOOLCHAIN)
    env = {**os.environ, "CMAKE_ARGS": " ".join([f"-DCMAKE_TOOLCHAIN_FILE={work / 'toolchain.cmake'}",
                                                   *LLAMA_CMAKE]),
           "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs), "_PYTHON_HOST_PLATFORM": "linux-aarch64"}
    try:
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary", LLAMA, "-w", work / "out",
              f"{LLAMA}=={version}"], f"cross-compiling {LLAMA} {version} for aarch64", log, env=env)
        built = sorted((work / "out").glob("llama_cpp_python-*.whl"))
        if not built or not built[0].name.endswith("-linux_aarch64.whl"):
            raise EdgePruneError(f"the cross build made {[b.name for b in built]}, not a linux_aarch64 wheel")
        check_wheel_arch(built[0])
        final = dest / built[0].name
        built[0].rename(final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install_site(site: Path, wheelhouse: Path, requirements: list[str], log) -> None:
    """Install aarch64 wheels into ``site`` with this host's pip (no code runs: wheels only)."""
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheelhouse, "--target", site,
          "--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
          *[x for t in platform_tags() for x in ("--platform", t)], *requirements],
         "pip install --target (aarch64 site-packages)", log)


def write_wrapper(path: Path, rootfs: Path, site: Path | None) -> None:
    qemu = shutil.which("qemu-aarch64-static")
    pythonpath = f'export PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}"\n' if site else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(WRAPPER.format(suite=SUITE, py=PYTHON, module=__name__, pythonpath=pythonpath, qemu=qemu,
                                   rootfs=rootfs))
    path.chmod(0o755)


# What the guests read as /proc/cpuinfo (qemu's -L prefix wins for every absolute path that exists in the root
# filesystem). onnxruntime's cpuinfo library segfaults at import when an aarch64 process reads an x86 cpuinfo, so
# the device describes its emulated CPU: qemu's "max" CPU has every feature listed (Cortex-A76 ids, as a Pi 5).
CPUINFO_CORE = """processor\t: {i}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

"""
CPUINFO_MODEL = "Model\t\t: edgeprune emulated aarch64 device (qemu-user on {host}; not a Raspberry Pi)\n"


def write_cpuinfo(rootfs: Path) -> None:
    import platform

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    (rootfs / "proc").mkdir(exist_ok=True)
    (rootfs / "proc" / "cpuinfo").write_text("".join(CPUINFO_CORE.format(i=i) for i in range(n))
                                             + CPUINFO_MODEL.format(host=platform.machine()))


SMOKE = """import json, platform, sys
import numpy, psutil, onnxruntime, tokenizers, llama_cpp
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__,
                  "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
                  "tokenizers": tokenizers.__version__, "llama_cpp": llama_cpp.__version__,
                  "llama_system_info": llama_cpp.llama_print_system_info().decode().strip()}))
"""


def _cached_step(record: Path, run, done: bool) -> dict:
    """Run a cached build step unless ``done``; its record (seconds, load average, CPUs) is kept next to its
    output, so that every later build can say what the step costs from scratch."""
    if done and record.is_file():
        return {**json.loads(record.read_text()), "seconds_this_run": 0.0}
    load, t = os.getloadavg(), time.perf_counter()
    if not done:
        run()
    rec = {"seconds": round(time.perf_counter() - t, 1), "load_avg_start": [round(x, 2) for x in load],
           "load_avg_end": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
           "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if done:  # built by an older run that kept no record
        rec = {**rec, "seconds": None, "note": "built before records were kept"}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(rec, indent=2) + "\n")
    return {**rec, "seconds_this_run": 0.0 if done else rec["seconds"]}


def build(jobs: int | None = None, log=None) -> Sim:
    """Build (or find) the emulated device for the versions installed here; every step is cached."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    missing = missing_tools()
    if missing:
        raise EdgePruneError("missing for the emulated aarch64 device: " + ", ".join(missing))
    versions = pinned_versions()
    key = sim_key(versions)
    found = find(versions)
    if found:
        log(f"emulated aarch64 device {found.root} is built")
        return found
    jobs = jobs or os.cpu_count() or 1
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    seconds, loads = {}, {"start": [round(x, 2) for x in os.getloadavg()]}
    rootfs = cache / f"rootfs-{SUITE}-{_digest([RECIPE, DEB_PACKAGES])}"
    wheelhouse = cache / "wheelhouse"
    for stale in cache.glob("*.partial-*"):  # an interrupted build's leftovers
        shutil.rmtree(stale, ignore_errors=True)
    log(f"[1/4] arm64 Debian {SUITE} root filesystem -> {rootfs}")
    steps = {"rootfs": _cached_step(rootfs.with_suffix(".json"), lambda: build_rootfs(rootfs, log),
                                    rootfs.is_dir())}
    log(f"[2/4] {LLAMA} {versions[LLAMA]} cross-compiled for {ARM_ARCH} ({jobs} jobs; the long step)")
    llama_dir = cache / f"llama-{versions[LLAMA]}-{_digest([RECIPE, LLAMA_CMAKE])}"
    steps["llama_cpp_cross_build"] = _cached_step(
        llama_dir / "build.json", lambda: cross_build_llama(llama_dir, versions[LLAMA], jobs, log),
        any(llama_dir.glob("*.whl")))
    llama = cross_build_llama(llama_dir, versions[LLAMA], jobs, log)  # the cached wheel
    seconds.update({k: v["seconds_this_run"] for k, v in steps.items()})
    t = time.perf_counter()
    reqs = [f"{d}=={versions[d]}" for d in REQUIREMENTS]
    log(f"[3/4] aarch64 wheels from PyPI: {', '.join(reqs)}")
    download_wheels(wheelhouse, [*reqs, str(llama), "pip"], platform_tags(), PYTHON, log)
    seconds["wheels"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    root = cache / f"sim-{key}"
    tmp = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"[4/4] device site-packages and wrappers -> {root}")
    install_site(tmp / "site", wheelhouse, [*reqs, str(llama)], log)
    write_wrapper(tmp / "bin" / "python", rootfs, root / "site")
    write_wrapper(tmp / "bin" / "python-bare", rootfs, None)
    write_cpuinfo(rootfs)
    seconds["site"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(tmp / "site")}
    out = _run([tmp / "bin" / "python-bare", "-c", SMOKE], "the smoke test on the emulated device", log, env=env)
    smoke = json.loads(out.strip().splitlines()[-1])
    if smoke["machine"] != "aarch64":
        raise EdgePruneError(f"the emulated device reports {smoke['machine']}, not aarch64")
    seconds["smoke_test"] = round(time.perf_counter() - t, 1)
    loads["end"] = [round(x, 2) for x in os.getloadavg()]
    record = {"schema": "edgeprune.sim/1", "key": key, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "suite": SUITE, "python": PYTHON, "arm_arch": ARM_ARCH, "llama_cmake": list(LLAMA_CMAKE),
              "versions": versions, "rootfs": str(rootfs), "wheelhouse": str(wheelhouse), "llama_wheel": str(llama),
              "seconds": seconds, "seconds_total": round(sum(seconds.values()), 1), "jobs": jobs,
              "cached_steps": steps,  # what each cached step cost when it was built (its seconds and load)
              "seconds_from_scratch": round(sum(seconds.values()) + sum(
                  (v["seconds"] or 0) - v["seconds_this_run"] for v in steps.values()), 1),
              "cpus": os.cpu_count(), "load_avg": loads, "smoke": smoke,
              "qemu": _run(["qemu-aarch64-static", "--version"], "qemu", lambda m: None).splitlines()[0]}
    (tmp / "sim.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    log(f"built in {record['seconds_total']} s ({', '.join(f'{k} {v} s' for k, v in seconds.items())}); "
        f"load average {loads['start']} -> {loads['end']} on {os.cpu_count()} CPUs")
    return Sim(root)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgeprune.devices.sim", description="The emulated aarch64 device.")
    ap.add_argument("command", choices=["build", "status", "python"],
                    help="build it (cached); status: print its build record; python: print its python wrapper")
    ap.add_argument("--jobs", type=int, help="parallel compile jobs (default: all CPUs)")
    args = ap.parse_args(argv)
    try:
        if args.command == "build":
            sim = build(args.jobs)
        else:
            sim = find()
            if sim is None:
                raise EdgePruneError(unavailable_reason() or "the emulated device is not built")
        if args.command == "python":
            print(sim.python)
        else:
            print(json.dumps(sim.record, indent=2))
    except EdgePruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
