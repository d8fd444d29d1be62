"""Content hashes of what a run reads: model files (remembered by path, size and mtime in the run directory, so
an unchanged model is not hashed again) and zero-shot task files. Not here: hashing a stage's inputs (engine)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgeprune.errors import EdgePruneError
from edgeprune.io import sha256_file, write_json


class Fingerprints:
    """Content hashes of model files, remembered by (path, size, mtime) in ``path``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def file(self, p: Path) -> str:
        st = p.stat()
        tag = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if tag not in self.known:
            self.known[tag] = sha256_file(p)
            self.changed = True
        return self.known[tag]

    def model(self, spec: str) -> str:
        from edgeprune.models.loader import is_hub_id, packaged_gguf

        gguf = packaged_gguf(spec)  # default, gemma3-270m: hashed like the file they name
        if gguf is not None:
            return "gguf:" + self.file(gguf)
        path = Path(spec).expanduser()
        if path.is_file():
            return "file:" + self.file(path)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(path).parts))
            if not files:
                raise EdgePruneError(f"model directory {path} is empty")
            h = hashlib.sha256()
            for f in files:
                h.update(f"{f.relative_to(path)}\0{self.file(f)}\n".encode())
            return "dir:" + h.hexdigest()
        if not is_hub_id(spec):
            raise EdgePruneError(f"model not found: {spec} (no such file or directory)")
        return "hub:" + spec  # a hub id: the name is all we know before loading

    def save(self) -> None:
        if self.changed:
            write_json(self.path, self.known)


def task_hashes(tasks: list[str], tasks_dir: Path) -> dict[str, str]:
    """sha256 of every file the zero-shot tasks read (one-line errors for unknown tasks and missing files)."""
    from edgeprune.evaluate.zeroshot import TASKS, task_files

    out = {}
    for t in tasks:
        if t not in TASKS:
            raise EdgePruneError(f"unknown zero-shot task '{t}' (known: {', '.join(TASKS)})")
        for rel in task_files(t):
            p = tasks_dir / rel
            if not p.is_file():
                raise EdgePruneError(f"{t} data file not found: {p}")
            out[rel] = sha256_file(p)
    return out
