"""Host side of profiling: run the device profiler here (``profile_local``) or ship an artifact bundle to a device
over SSH, verify its checksums there, run the profiler there and bring the JSON back (``ship``).

SSH goes through the system's OpenSSH client (``ssh``, ``scp``) and ``rsync`` when both ends have it: they
honour the user's ~/.ssh/config, agent and known_hosts, and need no extra dependency. Every call uses
``BatchMode=yes`` (no password or host-key prompt: an unknown or changed host key is an error, not a question),
a bounded ``ConnectTimeout`` and keep-alives, so a dead link fails instead of hanging. Remote commands are built
with ``shlex.quote`` for every argument; remote paths are restricted to a safe character set because scp and
rsync hand them to the remote side without a shell (SFTP) or with one (legacy scp), and must mean the same.

Transfers resume: files go into ``BUNDLES/NAME-ID.partial/``; files already there with the right sha256 are
skipped, rsync continues a partial file (``--partial``), scp re-sends it. Only after the device has verified
every file is the directory marked ``COMPLETE`` and renamed (see ``bundle.py``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edgeprune.devices import bundle
from edgeprune.devices import profiler as prof
from edgeprune.devices.profiles import DeviceProfile
from edgeprune.devices.ssh import (
    SAFE_PATH,
    Remote,
    error_line,
    run_streaming,
    safe_name,
    safe_remote_path,
    ssh_error,
)

from edgeprune.errors import EdgePruneError

DEVICE_DIR = Path(__file__).resolve().parent
CODE_FILES = ("profiler.py", "artifact_info.py", "memory_check.py", "machine.py", "timing.py", "ort_generate.py",
              "llama_generate.py", "bundle.py", "emulation.py", "greedy.py")
DEVICE_REQUIREMENTS = {
    "gguf": "numpy\npsutil\nllama-cpp-python  # CUDA build on Jetson: CMAKE_ARGS=-DGGML_CUDA=on\n",
    "onnx": "numpy\npsutil\ntokenizers\nonnxruntime  # onnxruntime-gpu (NVIDIA's Jetson wheel) on Jetson\n",
}
PIP_NAMES = {"llama_cpp": "llama-cpp-python", "onnxruntime": "onnxruntime"}
TRANSPORTS = ("auto", "rsync", "scp")


# ---- local profiling --------------------------------------------------------------------------------------------
def profile_local(artifact: Path, profile: DeviceProfile, overrides: dict | None = None,
                  timeout: float | None = None, quiet: bool = False) -> dict:
    """Run the device profiler on this machine, in a fresh Python process (so that its peak-memory figure is the
    profiler's own), with the device profile's settings."""
    fmt, _ = artifact_format(artifact)
    profile.check_format(fmt)
    args = profile.profiler_args(fmt, **(overrides or {}))
    cmd = [sys.executable, "-m", "edgeprune.devices.profiler", str(artifact), *args]
    rc, out, err = run_streaming(cmd, timeout=timeout, echo=None if quiet else "")
    if rc == -9:
        raise EdgePruneError(f"the profiler did not finish within {timeout:.0f} s")
    if rc != 0:
        raise EdgePruneError(error_line(err) if rc == 2 else f"the profiler failed (exit {rc}): {error_line(err)}")
    try:
        return json.loads(out)
    except ValueError:
        raise EdgePruneError(f"the profiler printed no JSON: {out[-200:]!r}") from None


def artifact_format(artifact: Path) -> tuple[str, Path]:
    try:
        return prof.artifact_format(Path(artifact))
    except prof.ProfileError as e:
        raise EdgePruneError(str(e)) from None


def check_memory_here(artifact: Path, profile: DeviceProfile, overrides: dict | None = None) -> dict | None:
    """The device-side memory check, done on the host before anything is uploaded (numeric budgets only:
    "auto" means the device's own RAM, which only the device knows)."""
    o = overrides or {}
    budget = o.get("memory_budget_mb") if o.get("memory_budget_mb") is not None else profile.memory_budget_mb
    if budget in (None, "auto"):
        return None
    try:
        return prof.memory_check_for(artifact, o.get("prompt_lengths") or profile.prompt_lengths,
                                     o.get("new_tokens") or profile.new_tokens, None, budget, profile.name)
    except prof.ProfileError as e:
        raise EdgePruneError(str(e)) from None


class Shipper:
    """One ship: the bundle's files, the remote paths and the SSH calls."""

    def __init__(self, remote: Remote, python: str, remote_dir: str, log=None):
        self.remote = remote
        self.python = python
        self.remote_dir = safe_remote_path(remote_dir, "remote directory")
        if not python or python.startswith("-") or any(c.isspace() for c in python):
            raise EdgePruneError(f"invalid remote python {python!r} (one program name or path)")
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # -- plumbing
    def run(self, argv_or_cmd, what: str, timeout: float | None = None, echo: str | None = None) -> str:
        cmd = argv_or_cmd if isinstance(argv_or_cmd, str) else shlex.join(argv_or_cmd)
        limit = timeout if timeout is not None else self.remote.connect_timeout + 900
        rc, out, err = run_streaming(self.remote.ssh(cmd), timeout=limit, echo=echo)
        if rc == 0:
            return out
        if rc == -9:
            raise EdgePruneError(f"{what} on {self.remote.label} did not finish within {limit:.0f} s")
        if rc == 255:
            raise EdgePruneError(ssh_error(self.remote, err) or f"ssh to {self.remote.label} failed: "
                                 f"{error_line(err)}")
        if rc == 127 and ("not found" in err or "No such file" in err):
            raise EdgePruneError(f"remote python '{self.python}' not found on {self.remote.label} (set [remote] "
                                 f"python in the device profile, or --python PATH)")
        if rc == 2 and "error: " in err:
            raise EdgePruneError(f"on {self.remote.label}: {error_line(err)}")
        raise EdgePruneError(f"{what} on {self.remote.label} failed (exit {rc}): {error_line(err)}")

    def agent(self, op: str, params: dict) -> dict:
        src = (DEVICE_DIR / "bundle.py").read_text()
        out = self.run([self.python, "-c", src, op, json.dumps(params, separators=(",", ":"))], f"bundle {op}")
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise EdgePruneError(f"bundle {op} on {self.remote.label} returned no result: {out[-200:]!r}") from None

    def pick_transport(self, transport: str, status: dict) -> str:
        if transport == "auto":
            return "rsync" if status["rsync"] and shutil.which("rsync") else "scp"
        if transport == "rsync" and not (status["rsync"] and shutil.which("rsync")):
            raise EdgePruneError(f"rsync is missing {'on ' + self.remote.label if not status['rsync'] else 'here'}; "
                                 f"use --transport scp")
        return transport

    def transfer(self, params: dict, manifest: dict, sources: dict, manifest_file: Path, status: dict,
                 transport: str, bwlimit: int | None) -> tuple[list, list, bool]:
        """Make the bundle ``params["final"]`` complete on the device: re-verify it when it is there, else upload
        the files the staging directory lacks and have the device verify every checksum before the rename.
        Returns (uploaded, reused, rechecked)."""
        log, label, name = self.log, self.remote.label, params["final"].rsplit("/", 1)[-1]
        uploaded, reused, rechecked = [], [], False
        if status["complete"]:
            check = self.agent("recheck", params)
            rechecked = True
            if check["ok"]:
                log(f"bundle {name} is already on {label}; checksums verified there")
                return [], sorted(manifest["files"]), True
            log(f"bundle on {label} changed ({', '.join(check['missing'] + check['bad'])}); re-uploading")
            status = self.agent("status", params)
        have = set(status["have"])
        need = [rel for rel in manifest["files"] if rel not in have]
        reused = sorted(have)
        size = sum(manifest["files"][r]["size"] for r in need)
        staging = params["staging"]
        log(f"uploading {len(need)} of {len(manifest['files'])} files ({size / 2**20:.1f} MiB) to "
            f"{label}:{staging} with {transport}" + (f" ({len(have)} already there)" if have else ""))
        pairs = [(sources[rel], f"{staging}/{rel.rsplit('/', 1)[0]}" if "/" in rel else staging) for rel in need]
        pairs.append((manifest_file, staging))
        self.upload(pairs, transport, bwlimit)
        uploaded = need
        result = self.agent("finalize", params)
        if not result["ok"]:
            bad = result.get("error") or ", ".join(result.get("bad", []) + result.get("missing", []))
            raise EdgePruneError(f"checksum verification failed on {label}: {bad}; the bundle stays "
                                 f"incomplete, rerun to upload the bad files again")
        log(f"verified {result['verified']} files on {label}: {params['final']}")
        return uploaded, reused, rechecked

    def upload(self, files: list[tuple[Path, str]], transport: str, bwlimit: int | None) -> None:
        """``files``: (local file, remote directory) pairs; each file keeps its name."""
        by_dir: dict[str, list[Path]] = {}
        for local, rdir in files:
            by_dir.setdefault(rdir, []).append(local)
        for rdir, locals_ in by_dir.items():
            if transport == "rsync":
                cmd = ["rsync", "--partial", "--ignore-times", "--times", "--chmod=F644", "-e",
                       self.remote.ssh_command_line()]
                if bwlimit:
                    cmd.append(f"--bwlimit={int(bwlimit)}")
            else:
                cmd = ["scp", "-q", *self.remote.options_args()]
                if self.remote.port:
                    cmd += ["-P", str(self.remote.port)]
                if bwlimit:
                    cmd += ["-l", str(int(bwlimit) * 8)]  # scp: Kbit/s
            cmd += ["--", *[str(p) for p in locals_], self.remote.target(rdir + "/")]
            rc, _, err = run_streaming(cmd)
            if rc != 0:
                reason = ssh_error(self.remote, err) or f"{transport} exit {rc}: {error_line(err)}"
                raise EdgePruneError(f"upload to {self.remote.label} interrupted: {reason}; the bundle on the "
                                     f"device stays incomplete, rerun to resume")


def _bundle_sources(artifact: Path, fmt: str, tmp: Path) -> dict[str, Path]:
    root = artifact if artifact.is_dir() else artifact.parent
    files = [f for f in sorted(root.rglob("*")) if f.is_file()] if artifact.is_dir() else [artifact]
    sources = {}
    for f in files:
        rel = f.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # temp files of an interrupted export, editor files
        if not SAFE_PATH.match(rel):
            raise EdgePruneError(f"artifact file name {rel!r} has characters that cannot be shipped safely")
        sources[f"{bundle.ARTIFACT_DIR}/{rel}"] = f
    for name in CODE_FILES:
        sources[f"{bundle.CODE_DIR}/{name}"] = DEVICE_DIR / name
    req = tmp / "requirements.txt"
    req.write_text(DEVICE_REQUIREMENTS[fmt])
    sources[f"{bundle.CODE_DIR}/requirements.txt"] = req
    return sources


def ship(artifact: Path, profile: DeviceProfile, remote: Remote, *, python: str | None = None,
         remote_dir: str | None = None, transport: str = "auto", bwlimit: int | None = None,
         run_profile: bool = True, overrides: dict | None = None, timeout: float = 3600, quiet: bool = False) -> dict:
    """Copy the bundle (artifact, tokenizer, device code, manifest with every file's sha256), verify it on the
    device, run the profiler there and return its JSON document with a ``ship`` section added."""
    if transport not in TRANSPORTS:
        raise EdgePruneError(f"unknown transport '{transport}'; choose from {', '.join(TRANSPORTS)}")
    artifact = Path(artifact)
    fmt, _ = artifact_format(artifact)
    profile.check_format(fmt)
    memory = check_memory_here(artifact, profile, overrides)
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    sh = Shipper(remote, python or profile.python, remote_dir or profile.remote_dir, log)
    start = time.perf_counter()
    name = safe_name(artifact.name if artifact.is_dir() else artifact.stem)
    with tempfile.TemporaryDirectory(prefix="edgeprune-bundle-") as tmpdir:
        tmp = Path(tmpdir)
        sources = _bundle_sources(artifact, fmt, tmp)
        manifest = bundle.build_manifest(name, sources, {"format": fmt, "artifact": artifact.name})
        (tmp / bundle.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        bid = manifest["id"]
        bundles = f"{sh.remote_dir}/bundles"
        final = f"{bundles}/{name}-{bid[:12]}"
        staging = final + bundle.PARTIAL_SUFFIX
        params = {"id": bid, "staging": staging, "final": final, "files": manifest["files"],
                  "modules": bundle.DEVICE_MODULES[fmt] if run_profile else []}
        log(f"connecting to {remote.label} ...")
        status = sh.agent("status", params)
        missing = [m for m, v in status["modules"].items() if not v["found"]]
        if missing:
            pip = " ".join(PIP_NAMES.get(m, m) for m in missing)
            raise EdgePruneError(f"{remote.label} ({sh.python}, Python {status['python']}) lacks {', '.join(missing)} "
                                 f"needed to profile {fmt}: pip install {pip} (the device-side install is in the "
                                 f"README)")
        transport = sh.pick_transport(transport, status)
        uploaded, reused, rechecked = sh.transfer(params, manifest, sources, tmp / bundle.MANIFEST, status,
                                                  transport, bwlimit)
    home = status["cwd"].rstrip("/")
    final_abs = final if final.startswith("/") else f"{home}/{final}"
    info = {"host": remote.label, "bundle_id": bid, "bundle": final_abs, "transport": transport,
            "files": len(manifest["files"]), "bytes": sum(f["size"] for f in manifest["files"].values()),
            "uploaded": uploaded, "reused": reused, "rechecked": rechecked, "remote_python": sh.python,
            "remote_python_version": status["python"], "host_memory_check": memory}
    if not run_profile:
        info["seconds"] = round(time.perf_counter() - start, 2)
        return {"schema": "edgeprune.ship/1", "device": profile.name, "ship": info}
    python_exe = sh.python if ("/" not in sh.python or sh.python.startswith("/")) else f"{home}/{sh.python}"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = f"{home}/{sh.remote_dir}/results" if not sh.remote_dir.startswith("/") else f"{sh.remote_dir}/results"
    result_path = f"{results}/{name}-{bid[:12]}-{safe_name(profile.name)}-{stamp}.json"
    args = [python_exe, "-B", f"{bundle.CODE_DIR}/profiler.py", bundle.ARTIFACT_DIR,
            *profile.profiler_args(fmt, **(overrides or {})), "--json", result_path]
    cmd = f"cd {shlex.quote(final_abs)} && {shlex.join(args)} && cat {shlex.quote(result_path)}"
    log(f"profiling on {remote.label} ...")
    out = sh.run(cmd, "the profiler", timeout=timeout, echo=None if quiet else f"[{profile.name}] ")
    try:
        doc = json.loads(out)
    except ValueError:
        raise EdgePruneError(f"the profiler on {remote.label} returned no JSON: {out[-200:]!r}") from None
    info["remote_result"] = result_path
    info["seconds"] = round(time.perf_counter() - start, 2)
    doc["ship"] = info
    return doc


def summary(doc: dict) -> list[str]:
    """Human-readable lines of a profile document."""
    a, r, m = doc["artifact"], doc["runtime"], doc["memory"]
    lines = [f"{a['name']} ({a['format']} {a.get('dtype') or ''}, {a['size_bytes'] / 2**20:.1f} MiB) on "
             f"{doc.get('device') or 'this machine'}: {doc['machine'].get('cpu_model')} "
             f"({doc.get('arch') or doc['machine'].get('arch')}"
             f"{'; EMULATED: not device timings' if doc.get('emulated') else ''}), {r['name']} "
             f"{r.get('version')} ({r['execution_provider']}, threads {r.get('threads')})",
             f"load {doc['load_s']:.2f} s, peak RSS {m['peak_rss_mb']} MiB"]
    for row in doc["prefill"]:
        lines.append(f"prompt {row['prompt_tokens']:>5} tokens: prefill {row['prefill_ms']:.1f} ms "
                     f"({row['prefill_tokens_per_s']:.0f} tok/s), TTFT {row['ttft_ms']:.1f} ms")
    d = doc["decode"]
    lines.append(f"decode after {d['prompt_tokens']} tokens: {d['tokens_per_s']} tok/s, per token p50 "
                 f"{d['ms_per_token_p50']} ms, p95 {d['ms_per_token_p95']} ms")
    lines += [f"warning: {w}" for w in doc.get("warnings", [])]
    return lines
