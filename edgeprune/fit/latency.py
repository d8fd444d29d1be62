"""Latency model of one device and runtime, ZipLM-style: decode time per token and time to first token as
functions of each layer's kept heads, KV heads and MLP width and of the dtype, fitted to profiles of a handful
of synthetic artifacts (random weights with the model's hidden size, head size and vocabulary; see
``synthetic.py``) that the device profiler measured once on the device. Tables are cached per device, machine,
runtime version, format and dtype under ``~/.cache/edgeprune/latency/`` (``$EDGEPRUNE_CACHE/latency``).

Decode is mostly memory traffic, so the model is bytes-based with a per-layer overhead::

    ms/token = c0 + c_layer * layers + c_attn * attention bytes + c_mlp * MLP bytes
    TTFT(P)  = b0 + b1 * P + b2 * P * decoder weights + b3 * P^2 * (query heads x head size, summed over layers)

(c0 holds the embedding / lm_head read and the runtime's fixed cost per token; c_attn and c_mlp differ where
attention and MLP run at different speeds per byte.) Coefficients are least squares, non-negative, on the
training shapes; the held-out shapes (per-layer widths the fit never saw) give the reported error.

Does NOT model batching, GPU offload beyond what the measured profiles contain, or contexts longer than the
profile's settings; and it knows nothing about quality (``search.py`` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune.errors import EdgePruneError
from edgeprune.fit.shapes import ModelShape, part_bytes

SCHEMA = "edgeprune.latency/1"
DECODE_TERMS = ("const", "layers", "attn_bytes", "mlp_bytes")
PREFILL_TERMS = ("const", "P", "P_weights", "P2_attn")


def cache_root() -> Path:
    from edgeprune.models.loader import cache_dir

    return cache_dir() / "latency"


# ---- features ---------------------------------------------------------------------------------------------------
def decode_features(shape: ModelShape, fmt: str, dtype: str) -> list[float]:
    p = part_bytes(shape, fmt, dtype)
    layers = sum(1 for L in shape.layers if L.heads or L.ffn)
    return [1.0, float(layers), sum(p["attention"]) / 1e6, sum(p["mlp"]) / 1e6]


def prefill_features(shape: ModelShape, prompt: int) -> list[float]:
    d, h = shape.head_dim, shape.hidden
    weights = sum((2 * L.heads + 2 * L.kv_heads) * d * h + 3 * L.ffn * h for L in shape.layers)
    attn = sum(L.heads * d for L in shape.layers)
    return [1.0, float(prompt), prompt * weights / 1e9, prompt * prompt * attn / 1e9]


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (drop the most negative term, refit; few terms)."""
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        coef[active] = sol
        if (sol >= 0).all() or len(active) == 1:
            return np.maximum(coef, 0.0)
        active.pop(int(np.argmin(sol)))


# ---- the model --------------------------------------------------------------------------------------------------
@dataclass
class LatencyModel:
    """Fitted coefficients of one (device, runtime, format, dtype) table, and its held-out error."""

    fmt: str
    dtype: str
    decode: list[float]
    prefill: list[float]
    prompt_lengths: list[int]
    errors: dict
    source: str = ""

    def decode_ms(self, shape: ModelShape) -> float:
        return float(np.dot(self.decode, decode_features(shape, self.fmt, self.dtype)))

    def decode_tok_s(self, shape: ModelShape) -> float:
        return 1000.0 / max(self.decode_ms(shape), 1e-6)

    def ttft_ms(self, shape: ModelShape, prompt: int) -> float:
        return float(np.dot(self.prefill, prefill_features(shape, prompt)))

    def unit_ms(self, shape: ModelShape) -> tuple[list[float], list[float]]:
        """Decode milliseconds one KV group (with its query heads) and one MLP channel cost in each layer: what
        removing it saves (the latency budget of the LSPS allocator)."""
        c_attn, c_mlp = self.decode[2] / 1e6, self.decode[3] / 1e6
        p = part_bytes(shape, self.fmt, self.dtype)
        group = [c_attn * (a - 4 * shape.hidden) / L.kv_heads if L.kv_heads else 0.0
                 for a, L in zip(p["attention"], shape.layers, strict=True)]
        channel = [c_mlp * (m - 4 * shape.hidden) / L.ffn if L.ffn else 0.0
                   for m, L in zip(p["mlp"], shape.layers, strict=True)]
        return group, channel

    @classmethod
    def fit(cls, table: dict) -> LatencyModel:
        rows = table["rows"]
        fmt, dtype = table["format"], table["dtype"]
        train = [r for r in rows if not r["held_out"]]
        if len(train) < len(DECODE_TERMS):
            raise EdgePruneError(f"the latency table {table.get('path', '')} has too few shapes to fit")

        def dx(r):
            return decode_features(ModelShape.from_dict(r["shape"]), fmt, dtype)

        def px(r):
            s = ModelShape.from_dict(r["shape"])
            return [(prefill_features(s, int(p)), ms) for p, ms in r["ttft_ms"].items()]

        dec = _nnls(np.array([dx(r) for r in train]), np.array([r["decode_ms"] for r in train]))
        pre_rows = [xy for r in train for xy in px(r)]
        pre = _nnls(np.array([x for x, _ in pre_rows]), np.array([y for _, y in pre_rows]))
        model = cls(fmt, dtype, dec.tolist(), pre.tolist(), sorted({int(p) for r in rows for p in r["ttft_ms"]}),
                    {}, table.get("path", ""))
        model.errors = model.evaluate(rows)
        return model

    def evaluate(self, rows: list[dict]) -> dict:
        """Relative errors (predicted / measured - 1) of decode tok/s and TTFT on the training and held-out rows."""
        out = {}
        for part in ("train", "held_out"):
            sel = [r for r in rows if r["held_out"] == (part == "held_out")]
            dec = [1000.0 / self.decode_ms(ModelShape.from_dict(r["shape"])) / r["decode_tok_s"] - 1 for r in sel]
            pre = [self.ttft_ms(ModelShape.from_dict(r["shape"]), int(p)) / ms - 1
                   for r in sel for p, ms in r["ttft_ms"].items()]
            out[part] = {"shapes": len(sel), "decode_tok_s": _err(dec), "ttft_ms": _err(pre),
                         "decode_by_shape": {r["name"]: round(e, 4) for r, e in zip(sel, dec, strict=True)}}
        return out


def _err(xs: list[float]) -> dict:
    if not xs:
        return {"mean_abs": None, "max_abs": None}
    return {"mean_abs": round(statistics.fmean(abs(x) for x in xs), 4), "max_abs": round(max(abs(x) for x in xs), 4),
            "mean": round(statistics.fmean(xs), 4)}


# ---- the table: measured once per device and runtime, then cached --------------------------------------------
def local_machine_key() -> dict:
    """What identifies this machine and its runtimes (the cache key of a table measured here)."""
    from edgeprune.devices import machine

    m = machine.machine_info()
    return {"cpu_model": m["cpu_model"], "arch": m["arch"], "logical_cores": m["logical_cores"],
            "memory_total_gb": round(m["memory_total_mb"] / 1024), "os": platform.system(),
            "runtimes": machine.versions(["llama_cpp", "onnxruntime"])}


def table_key(device: str, host: str | None, fmt: str, dtype: str, base: ModelShape, settings: dict,
              threads) -> tuple[str, dict]:
    ident = {"schema": SCHEMA, "device": device, "host": host, "format": fmt, "dtype": dtype, "threads": str(threads),
             "machine": None if host else local_machine_key(),
             "shape": {"hidden": base.hidden, "head_dim": base.head_dim, "vocab": base.vocab, "tied": base.tied,
                       "layers": len(base.layers), "qkv_bias": base.qkv_bias},
             "settings": {"prompt_lengths": sorted(settings["prompt_lengths"]),
                          "new_tokens": settings["new_tokens"]}}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{device}-{fmt}-{dtype}-{digest}", ident


def best_decode_tok_s(doc: dict) -> float:
    """The fastest repeat's decode tokens/s: on a shared machine the least-disturbed run is the most
    reproducible statistic (the median is kept in the profile document)."""
    runs = [x for x in doc["decode"].get("tokens_per_s_all") or [] if x]
    return max(runs) if runs else doc["decode"]["tokens_per_s"]


def best_ttft_ms(doc: dict) -> dict:
    """Prompt tokens -> the quickest repeat's time to first token."""
    return {r["prompt_tokens"]: min([x for x in r.get("ttft_ms_all") or [] if x] or [r["ttft_ms"]])
            for r in doc["prefill"]}


def table_row(name: str, shape: ModelShape, held_out: bool, doc: dict) -> dict:
    """One measured shape, from the profiler's JSON document (the fastest repeats; see ``best_decode_tok_s``)."""
    tok_s = best_decode_tok_s(doc)
    return {"name": name, "held_out": held_out, "shape": shape.to_dict(),
            "decode_tok_s": tok_s, "decode_ms": 1000.0 / tok_s, "decode_tok_s_median": doc["decode"]["tokens_per_s"],
            "ttft_ms": {str(k): v for k, v in best_ttft_ms(doc).items()},
            "peak_rss_mb": doc["memory"]["peak_rss_mb"], "model_bytes": doc["artifact"]["model_bytes"],
            "memory_check": doc.get("memory_check"), "load_avg": [doc["machine"].get("load_avg"),
                                                                  doc["machine"].get("load_avg_end")]}


def load_table(key: str) -> dict | None:
    path = cache_root() / f"{key}.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if table.get("schema") != SCHEMA or not table.get("complete"):
        return None
    table["path"] = str(path)
    return table


def save_table(key: str, table: dict) -> Path:
    from edgeprune.io import write_json

    path = cache_root() / f"{key}.json"
    write_json(path, table)
    return path


def measure_table(key: str, ident: dict, base: ModelShape, tokenizer_dir: Path, fmt: str, dtype: str,
                  run_profile, log=print, seed: int = 0) -> dict:
    """Build each probe shape as a synthetic artifact, profile it with ``run_profile(artifact_dir) -> doc`` (here or
    on the device), and save the table. Rows are saved as they come, so an interrupted measurement resumes."""
    from edgeprune.fit.synthetic import build_artifact, probe_shapes

    root = cache_root()
    work = root / "work" / key
    partial = root / f"{key}.partial.json"
    try:
        table = json.loads(partial.read_text())
    except (OSError, ValueError):
        table = {"schema": SCHEMA, "key": key, "ident": ident, "format": fmt, "dtype": dtype, "rows": [],
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "complete": False}
    done = {r["name"] for r in table["rows"]}
    probes = probe_shapes(base, seed)
    start = time.perf_counter()
    for i, (name, shape, held_out) in enumerate(probes, 1):
        if name in done:
            continue
        log(f"latency table {fmt} {dtype}: shape {i}/{len(probes)} {name} ({len(shape.layers)} layers)")
        art = build_artifact(shape, tokenizer_dir, fmt, dtype, work / name, seed=seed + i)
        doc = run_profile(art)
        table["rows"].append(table_row(name, shape, held_out, doc))
        table["machine"] = doc["machine"]
        table["runtime"] = {k: doc["runtime"].get(k) for k in ("name", "version", "execution_provider", "threads")}
        from edgeprune.io import write_json

        write_json(partial, table)
        shutil.rmtree(work / name, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    table["complete"] = True
    table["seconds"] = round(time.perf_counter() - start, 1)
    model = LatencyModel.fit(table)
    table["model"] = {"decode": dict(zip(DECODE_TERMS, model.decode, strict=True)),
                      "prefill": dict(zip(PREFILL_TERMS, model.prefill, strict=True)), "errors": model.errors}
    path = save_table(key, table)
    if partial.exists():
        os.unlink(partial)
    table["path"] = str(path)
    return table
