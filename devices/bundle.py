"""Bundles: an artifact plus the device-side code, with the sha256 of every file, and the small agent that checks
them on the device. Standard library only, Python 3.8+: the host runs this file on the device with
``python3 -c <this source> OP JSON`` before anything is uploaded, so it can neither import its siblings nor
anything that is not in the standard library.

On the device a bundle lives in ``BUNDLES/NAME-ID/`` (ID: the first 12 hex digits of the hash of the file list).
Files are uploaded into ``BUNDLES/NAME-ID.partial/``; only after every file's sha256 matched is ``COMPLETE``
written and the directory renamed to its final name, so an interrupted upload is never mistaken for a bundle,
and the next upload resumes from the files (or, with rsync, the partial file) already there.

By hand, on the device: ``python3 edgeprune_device/bundle.py verify BUNDLE_DIR`` (exit 0 when every file matches).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

SCHEMA = "edgeprune.bundle/1"
MANIFEST = "bundle.json"
COMPLETE = "COMPLETE"
ARTIFACT_DIR = "artifact"
CODE_DIR = "edgeprune_device"
PARTIAL_SUFFIX = ".partial"
# what the profiler needs on the device, by artifact format (import names)
DEVICE_MODULES = {"gguf": ("numpy", "psutil", "llama_cpp"), "onnx": ("numpy", "psutil", "onnxruntime", "tokenizers")}


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def bundle_id(files: dict) -> str:
    """Hash of the sorted (path, sha256, size) list: equal ids mean equal bundles."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['sha256']}\0{files[rel]['size']}\n".encode())
    return h.hexdigest()


def build_manifest(name: str, sources: dict, extra: dict | None = None) -> dict:
    """``sources``: {path inside the bundle: local file}. Returns the bundle manifest (not yet written)."""
    files = {}
    for rel in sorted(sources):
        path = sources[rel]
        files[rel] = {"sha256": sha256_file(path), "size": os.path.getsize(path)}
    return {"schema": SCHEMA, "name": name, "id": bundle_id(files),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files, **(extra or {})}


def check_files(root: str, files: dict) -> dict:
    """Compare the files under ``root`` with ``files`` ({rel: {sha256, size}}): {"missing", "bad", "verified"}."""
    missing, bad, ok = [], [], 0
    for rel in sorted(files):
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            missing.append(rel)
        elif os.path.getsize(path) != files[rel]["size"] or sha256_file(path) != files[rel]["sha256"]:
            bad.append(rel)
        else:
            ok += 1
    return {"missing": missing, "bad": bad, "verified": ok}


def _read_manifest(root: str) -> dict:
    with open(os.path.join(root, MANIFEST)) as f:
        return json.load(f)


def _complete_id(final: str):
    try:
        with open(os.path.join(final, COMPLETE)) as f:
            return json.load(f).get("id")
    except (OSError, ValueError):
        return None


def _modules(names) -> dict:
    import importlib.util

    out = {}
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        version = None
        if found:
            try:
                from importlib import metadata

                dist = {"llama_cpp": "llama-cpp-python", "onnxruntime": None}.get(name, name)
                for candidate in ([dist] if dist else ["onnxruntime", "onnxruntime-gpu"]):
                    try:
                        version = metadata.version(candidate)
                        break
                    except metadata.PackageNotFoundError:
                        continue
            except ImportError:
                pass
        out[name] = {"found": found, "version": version}
    return out


# ---- agent operations (run on the device) ------------------------------------------------------------------
def op_status(p: dict) -> dict:
    """Is the bundle there already? Which files of an interrupted upload are usable? Which modules exist?"""
    staging, final, files = p["staging"], p["final"], p["files"]
    out = {"python": sys.version.split()[0], "platform": sys.platform, "cwd": os.getcwd(),
           "rsync": shutil.which("rsync") is not None, "modules": _modules(p.get("modules", ())),
           "complete": _complete_id(final) == p["id"], "have": []}
    if out["complete"]:
        return out
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(staging, rel)) or staging, exist_ok=True)
    os.makedirs(staging, exist_ok=True)
    for rel, want in files.items():
        path = os.path.join(staging, rel)
        if os.path.isfile(path) and os.path.getsize(path) == want["size"] and sha256_file(path) == want["sha256"]:
            out["have"].append(rel)
    return out


def op_finalize(p: dict) -> dict:
    """Verify every file of the staging directory; only then mark it complete and rename it into place."""
    staging, final = p["staging"], p["final"]
    try:
        manifest = _read_manifest(staging)
    except (OSError, ValueError) as e:
        return {"ok": False, "error": f"no readable {MANIFEST} in {staging}: {e}"}
    if manifest.get("id") != p["id"] or bundle_id(manifest["files"]) != p["id"]:
        return {"ok": False, "error": f"{MANIFEST} in {staging} is not bundle {p['id'][:12]}"}
    result = check_files(staging, manifest["files"])
    if result["missing"] or result["bad"]:
        return {"ok": False, **result}
    with open(os.path.join(staging, COMPLETE), "w") as f:
        json.dump({"id": p["id"], "verified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "files": result["verified"]}, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(staging, final)
    return {"ok": True, **result}


def op_recheck(p: dict) -> dict:
    """Re-verify a complete bundle; if a file changed on the device, turn it back into a staging directory."""
    final, staging = p["final"], p["staging"]
    try:
        manifest = _read_manifest(final)
    except (OSError, ValueError) as e:
        manifest = None
        result = {"missing": [MANIFEST], "bad": [], "verified": 0, "error": str(e)}
    if manifest is not None:
        result = check_files(final, manifest["files"])
    if not result["missing"] and not result["bad"]:
        return {"ok": True, **result}
    if os.path.exists(os.path.join(final, COMPLETE)):
        os.remove(os.path.join(final, COMPLETE))
    if os.path.exists(staging):
        shutil.rmtree(staging)
    os.rename(final, staging)
    return {"ok": False, **result}


def op_probe(p: dict) -> dict:
    """What a device setup needs to know: the interpreter, its platform (for the wheels) and which of the
    modules in ``p["modules"]`` it already has."""
    import importlib.util
    import platform

    libc, libc_version = platform.libc_ver()
    return {"python": sys.version.split()[0], "implementation": sys.implementation.name,
            "machine": platform.machine(), "system": platform.system(), "libc": libc, "libc_version": libc_version,
            "executable": sys.executable, "cwd": os.getcwd(), "rsync": shutil.which("rsync") is not None,
            "venv": importlib.util.find_spec("venv") is not None, "modules": _modules(p.get("modules", ()))}


OPS = {"status": op_status, "finalize": op_finalize, "recheck": op_recheck, "probe": op_probe}


def main(argv) -> int:
    if len(argv) == 2 and argv[0] == "verify":
        root = argv[1]
        try:
            manifest = _read_manifest(root)
        except (OSError, ValueError) as e:
            print(f"error: no readable {MANIFEST} in {root}: {e}", file=sys.stderr)
            return 2
        result = check_files(root, manifest["files"])
        complete = _complete_id(root) == manifest.get("id")
        print(json.dumps({"ok": not result["missing"] and not result["bad"], "complete": complete, **result}))
        return 0 if not result["missing"] and not result["bad"] else 3
    if len(argv) == 2 and argv[0] in OPS:
        print(json.dumps(OPS[argv[0]](json.loads(argv[1]))))
        return 0
    print("usage: bundle.py verify BUNDLE_DIR   (or: bundle.py status|finalize|recheck|probe JSON)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
