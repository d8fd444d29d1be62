"""Shared pieces of the benchmark scripts: the fixed evaluation budget, result files, table rendering."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
# Grids score every row on the same first N tokens of WikiText-2 raw test (seq 128); headline rows use all.
GRID_TOKENS = 32768
# The larger grids (PIEM's term weights, the ablation: dozens of rows, some with recovery) use a quarter of that.
SMALL_GRID_TOKENS = 8192


def data_dir(arg: str | None) -> Path:
    d = Path(arg or os.environ.get("EDGEPRUNE_DATA", DEFAULT_DATA))
    if not (d / "wikitext-2" / "wiki.test.raw").is_file():
        sys.exit(f"error: WikiText-2 not found under {d} (pass --data DIR)")
    return d


def save(name: str, data: dict) -> Path:
    from edgeprune.io import write_json

    path = RESULTS / f"{name}.json"
    write_json(path, data)
    return path


def load_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
