"""Is this process running under a user-mode CPU emulator (qemu-user)? Runs on the device: standard library only,
Python 3.8+, so the host can also run this file's source alone with ``python -c`` (see ``remote.py``).

Emulated timings are not device timings, so the profiler records the answer next to every measurement. Only
evidence the kernel gives (which an emulator does not rewrite) decides; an environment marker is reported but
cannot decide on its own:

* ``comm``: the kernel's name of this process (``/proc/self/comm``, ``Name:`` in ``/proc/self/status``) is the
  emulator's, e.g. ``qemu-aarch64-st`` when qemu is invoked explicitly (``qemu-aarch64-static -L ROOTFS python``).
  qemu-user rewrites ``/proc/self/exe`` and ``/proc/self/maps`` for the guest, not ``comm``.
* ``kernel``: the kernel's own architecture (``/proc/sys/kernel/arch``, Linux 6.1+) is of another family than
  ``platform.machine()`` (which qemu-user fakes through ``uname``): an aarch64 process on an x86_64 kernel. This
  also catches qemu started through binfmt_misc, where ``comm`` is the guest program's name.
* ``cpuinfo`` (older kernels): ``/proc/cpuinfo`` describes a CPU of another architecture (x86 ``vendor_id``
  seen by an aarch64 process). The emulated device of ``sim.py`` gives its guests an ARM ``/proc/cpuinfo`` (qemu's
  ``-L`` prefix, which onnxruntime needs), so there only ``comm`` and ``kernel`` fire.
* ``marker`` (reported, not decisive): ``EDGEPRUNE_EMULATOR``, set by the emulated device's python wrapper.

Not detected: full-system emulation or virtual machines (the guest kernel is then consistent with itself), and
a user-mode emulator that fakes both ``comm`` and ``/proc/cpuinfo``.

By hand: ``python3 emulation.py`` prints the JSON.
"""

from __future__ import annotations

import json
import os
import platform
import sys

_ARM = ("aarch64", "arm64", "armv7l", "armv8l", "armv6l")
_X86 = ("x86_64", "amd64", "i386", "i686")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _cpuinfo_arch(text: str) -> str | None:
    """The architecture family ``/proc/cpuinfo`` describes: "x86", "arm" or None (unknown)."""
    keys = {line.partition(":")[0].strip() for line in text.splitlines()}
    if "vendor_id" in keys and ("flags" in keys or "model name" in keys):
        return "x86"
    if "CPU implementer" in keys or ("Features" in keys and "CPU architecture" in keys):
        return "arm"
    return None


def _family(machine: str | None) -> str | None:
    machine = (machine or "").lower()
    return "arm" if machine in _ARM else "x86" if machine in _X86 else None


def detect() -> dict:
    """{"emulated": bool, "evidence": [...], "emulator": name or None, "machine": platform.machine(), ...}."""
    machine = platform.machine().lower()
    evidence: list[str] = []
    emulator = None
    comm = _read("/proc/self/comm").strip()
    if comm.startswith("qemu-"):
        evidence.append(f"comm: this process is '{comm}' (the kernel's process name)")
        emulator = comm
    family = _family(machine)
    kernel = _read("/proc/sys/kernel/arch").strip() or None
    if family and _family(kernel) and _family(kernel) != family:
        evidence.append(f"kernel: the kernel is {kernel} (/proc/sys/kernel/arch) but this process runs as {machine}")
        emulator = emulator or f"user-mode emulation on a {kernel} kernel"
    described = _cpuinfo_arch(_read("/proc/cpuinfo"))
    if family and described and described != family:
        evidence.append(f"cpuinfo: /proc/cpuinfo describes an {described} CPU but this process runs as {machine}")
        emulator = emulator or f"user-mode emulation on an {described} host"
    marker = os.environ.get("EDGEPRUNE_EMULATOR") or None
    return {"emulated": bool(evidence), "emulator": emulator, "evidence": evidence, "marker": marker,
            "machine": platform.machine(), "kernel_arch": kernel, "cpuinfo_arch": described}


if __name__ == "__main__":
    json.dump(detect(), sys.stdout)
    print()
