"""This machine and this process: CPU, board, cores, memory, OS, load, emulation (``emulation.py``), the versions of
the installed runtimes, and the process's resident memory now and at its peak. Runs on the device: standard
library and psutil.

It measures no model (``timing.py``) and predicts no memory use (``memory_check.py``).
"""

from __future__ import annotations

import os
import platform
import sys

if __package__:
    from . import emulation
else:  # alone in a bundle, beside its sibling modules
    import emulation

MiB = 1 << 20


def first_line_of(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\0", b"").decode(errors="replace").strip().splitlines()[0] or None
    except (OSError, IndexError):
        return None


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (ARM: implementer and part ids), else platform.processor()."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if fields.get(key):
            return fields[key]
    if fields.get("CPU part"):  # ARM without a model name: implementer/part ids (0xd0b = Cortex-A76)
        return f"ARM implementer {fields.get('CPU implementer')} part {fields['CPU part']}"
    return platform.processor() or None


def _os_release() -> str | None:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def machine_info() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    freq = None
    try:
        f = psutil.cpu_freq()
        freq = round(f.max or f.current) if f else None
    except (OSError, NotImplementedError, AttributeError):
        pass
    emulated = emulation.detect()
    return {"cpu_model": cpu_model(), "board": first_line_of("/proc/device-tree/model"),
            "arch": platform.machine(), "emulated": emulated["emulated"], "emulation": emulated,
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True), "cpu_max_mhz": freq,
            "memory_total_mb": round(vm.total / MiB), "memory_available_mb": round(vm.available / MiB),
            "os": platform.platform(), "os_release": _os_release(), "python": platform.python_version(),
            "jetson_release": first_line_of("/etc/nv_tegra_release"),
            "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


_DISTRIBUTIONS = {"llama_cpp": ("llama-cpp-python",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


def versions(names) -> dict:
    """Versions of the modules that are installed, without importing the ones not loaded yet."""
    from importlib import metadata

    out = {}
    for name in names:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__version__", None):
            out[name] = mod.__version__
            continue
        for dist in _DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / MiB


def peak_rss_mb() -> tuple[float | None, str]:
    """The process's resident high-water mark: VmHWM (Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "VmHWM"
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak / MiB if sys.platform == "darwin" else peak / 1024), "ru_maxrss"
    except (ImportError, OSError):
        return None, "unavailable"
