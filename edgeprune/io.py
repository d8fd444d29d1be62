"""Atomic writes and artifact manifests: a file or directory without a complete manifest is not an artifact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def read_toml(path: str | Path, what: str) -> dict:
    """Parse a TOML file (tomllib; tomli on Python 3.10), with one-line errors naming ``what`` it is."""
    from edgeprune.errors import EdgePruneError

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise EdgePruneError(f"reading a {what} on Python 3.10 needs tomli: pip install tomli") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise EdgePruneError(f"cannot read {what} {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgePruneError(f"{what} {path} is not valid TOML: {e}") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def package_versions(names: tuple[str, ...] = ("edgeprune", "torch", "transformers", "numpy")) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def check_writable_parent(path: Path) -> None:
    from edgeprune.errors import EdgePruneError

    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgePruneError(f"cannot create output directory {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise EdgePruneError(f"output directory {parent} is not writable")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    check_writable_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would outlive the rename
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask (reading it means setting it; set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` in one rename.

    On failure the temp directory is removed and an existing ``path`` is left untouched.
    """
    from edgeprune.errors import EdgePruneError

    path = Path(path)
    check_writable_parent(path)
    if path.exists() and not path.is_dir():
        raise EdgePruneError(f"output path {path} exists and is not a directory")
    if path.exists() and not overwrite:
        raise EdgePruneError(f"output directory {path} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would outlive the rename; a plain mkdir's mode instead
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def manifest(kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "versions": package_versions(),
        **fields,
    }
