"""Export table (issue #5): every export format, dtype and INT8 path of the dense default model and a 30 % PIEM-pruned
one, with artifact size, parity, and perplexity in its own runtime next to PyTorch's on the same token windows.
Writes bench/results/export.json; rows are merged by key (MODEL/ARTIFACT), saved after each one, and rows already
measured are skipped, so an interrupted run resumes.

    python bench/export_table.py                       # accuracy phase: export (when missing), parity, PPL
    python bench/export_table.py --speed               # speed phase: prefill ms (128 tokens), decode tok/s
    python bench/export_table.py --only dense/onnx-int8-nbits8 --force
    python bench/export_table.py --models dense --artifacts onnx-fp32,gguf-q8_0

A default run leaves out the rows in DEFAULT_SKIP (name them with --artifacts to add them); rows already in the
results are kept and shown whatever the run's selection.

Accuracy: PyTorch (fp32), onnxruntime and llama.cpp score the same windows: WikiText-2 raw test tokenized once with
the model's Hugging Face tokenizer (no special tokens), the first TOKENS = 8192 tokens cut into 64 windows of 128,
each scored independently (edgeprune's protocol; the token ids are handed to every runtime, so tokenizers cannot
differ). Speed (`--speed`, run it when the machine is quiet): the device profiler (`edgeprune profile ARTIFACT
--device cpu`, a fresh process per artifact) with 128-token prompts and 64 decode steps.

Artifacts go to out/bench/artifacts/MODEL/ARTIFACT. The product paths are the CLI's (`edgeprune export`):
ONNX fp32/fp16/int8 (int8 = DEFAULT_INT8) and GGUF f32/f16/q8_0/q4_k_m. The other INT8 paths are the remaining
recipes of edgeprune.export.onnx (smooth-hybrid traced from a smoothed model, the others applied to the fp32
artifact's graph, which is what export_onnx does) and a few variants that are not recipes (accuracy_level 0,
float lm_head/embedding, per-channel quantize_dynamic). A path that fails its parity check is still measured (its
manifest records the failed check), since the table is there to show why it is not the default. The pruned model
is built with `edgeprune prune default --ratio 0.3 --scorer piem --allocator lsps --sensitivity bi --reconstruct
--calib WikiText-2 valid` when out/bench/piem-lsps-30 is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import DEFAULT_DATA, ROOT, load_result, save

NAME = "export"
TOKENS = 8192
SEQ_LEN = 128
ART_DIR = ROOT / "out" / "bench" / "artifacts"
PRUNED = ROOT / "out" / "bench" / "piem-lsps-30"
MODELS = {"dense": "default", "piem-lsps-30": str(PRUNED.relative_to(ROOT))}
# pinned (not the CLI's defaults) so that a rebuilt model is the one these results were measured on
PRUNE_ARGS = ("prune", "default", "--ratio", "0.3", "--scorer", "piem", "--allocator", "lsps", "--sensitivity", "bi",
              "--reconstruct", "--rounds", "1")
# PPL tolerance of the float exports against PyTorch on the same windows, in % of PyTorch's PPL (fixed beforehand:
# float32 logits agree to ~1e-4, float16 to ~0.04, so these bound round-off, not modelling differences)
FLOAT_TOLERANCE_PCT = {"fp32": 0.1, "f32": 0.1, "fp16": 0.5, "f16": 0.5}
INT8_TARGET_PCT = 3.0  # issue #5: an INT8 path within 3 % of fp32
SPEED_PROMPT = 128
SPEED_NEW_TOKENS = 64
SPEED_REPEATS = 3
QUIET_LOAD = 1.5


@dataclass
class Spec:
    name: str  # artifact name: FORMAT-DTYPE[-PATH]
    fmt: str
    dtype: str  # onnx fp32/fp16/int8, gguf f32/f16/q8_0/q4_k_m
    path: str  # what was done, for the table
    build: Callable  # build(ctx, out_dir) -> None
    product: bool = False  # what `edgeprune export` writes for this format/dtype


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# builders


class Ctx:
    """One model: its checkpoint directory, the artifacts built so far."""

    def __init__(self, label: str, spec: str):
        from edgeprune.export.artifacts import resolve_checkpoint

        self.label, self.spec = label, spec
        self.ckpt = resolve_checkpoint(spec if spec == "default" else str(ROOT / spec))
        self.dir = ART_DIR / label

    def artifact(self, name: str) -> Path:
        return self.dir / name


def _cli_export(fmt: str, dtype: str, optimize: bool | None = None):
    def build(ctx: Ctx, out: Path) -> None:
        from edgeprune.export.artifacts import DTYPES, export_gguf_artifact

        if fmt == "gguf":
            parity = export_gguf_artifact(ctx.ckpt, out, DTYPES[dtype][1], require_parity=False)["parity"]
            if not parity["passed"]:
                _log(f"  GGUF parity check failed ({dtype}): kept to measure it anyway (manifest: "
                     "parity_failed_at_export)")
        else:
            _onnx_export(ctx, out, DTYPES[dtype][0], optimize=optimize)
    return build


def _onnx_export(ctx: Ctx, out: Path, dtype: str, optimize: bool | None = None, recipe: str | None = None) -> None:
    """export_onnx; when the parity check fails, export again without it and record the failed check."""
    from edgeprune.export.onnx import check_onnx, export_onnx

    from edgeprune.errors import EdgePruneError

    try:
        export_onnx(ctx.ckpt, out, dtype, optimize, int8_recipe=recipe)
        return
    except EdgePruneError as e:
        if "parity check failed" not in str(e):
            raise
        _log(f"  {e} -- exporting without the check to measure it anyway")
    export_onnx(ctx.ckpt, out, dtype, optimize, int8_recipe=recipe, check=False)
    _add_parity(out, check_onnx(out, ctx.ckpt))


def _add_parity(out: Path, parity: dict) -> None:
    from edgeprune.io import write_json

    m = json.loads((out / "manifest.json").read_text())
    m["parity"] = parity
    m["parity_checked_after_export"] = True
    write_json(out / "manifest.json", m)


def _recipe(recipe: str):
    def build(ctx: Ctx, out: Path) -> None:
        _onnx_export(ctx, out, "int8", recipe=recipe)
    return build


def _derived(quantize: Callable[[Path, Path], dict]):
    """An INT8 graph made from the fp32 artifact's graph (what export_onnx does after tracing), parity-checked
    against PyTorch like an export; the manifest is the fp32 one with the quantization and the new check."""
    def build(ctx: Ctx, out: Path) -> None:
        from edgeprune.export.onnx import MODEL_FILE, check_onnx
        from edgeprune.export.onnx_files import file_bytes

        from edgeprune.io import atomic_dir, manifest, write_json

        src = ctx.artifact("onnx-fp32")
        _ensure(ctx, SPECS["onnx-fp32"])
        start = time.perf_counter()
        base = json.loads((src / "manifest.json").read_text())
        with atomic_dir(out) as tmp:
            info = quantize(src / MODEL_FILE, tmp / MODEL_FILE)
            for f in src.iterdir():
                if f.is_file() and f.name not in (MODEL_FILE, MODEL_FILE + ".data", "manifest.json"):
                    shutil.copy2(f, tmp / f.name)
            fields = {k: v for k, v in base.items() if k not in ("kind", "created", "command", "versions", "parity",
                                                                  "seconds", "size_bytes", "external_data")}
            fields.update(dtype="int8", quantization=info, derived_from=str(src.relative_to(ROOT)),
                          external_data=(tmp / (MODEL_FILE + ".data")).exists(),
                          size_bytes=file_bytes(tmp / MODEL_FILE))
            fields["parity"] = check_onnx(tmp, ctx.ckpt)
            fields["seconds"] = round(time.perf_counter() - start, 2)
            write_json(tmp / "manifest.json", manifest("onnx-export", **fields))
    return build


def _q_recipe(recipe: str):
    def q(src: Path, dst: Path) -> dict:
        from edgeprune.export.onnx import quantize_int8

        return {"recipe": recipe, **quantize_int8(src, dst, recipe)}
    return q


def _q_nbits(**kw):
    def q(src: Path, dst: Path) -> dict:
        from edgeprune.export.onnx import quantize_nbits

        return {"method": "MatMulNBits", **quantize_nbits(src, dst, bits=8, **kw)}
    return q


def _q_dynamic_per_channel(src: Path, dst: Path) -> dict:
    from edgeprune.export.onnx import quantize_dyn

    return quantize_dyn(src, dst, per_channel=True)


SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("onnx-fp32", "onnx", "fp32", "float32 graph", _cli_export("onnx", "fp32"), product=True),
    Spec("onnx-fp32-opt", "onnx", "fp32", "float32 + onnxruntime transformer optimizer (norm fusions)",
         _cli_export("onnx", "fp32", optimize=True)),
    Spec("onnx-fp16", "onnx", "fp16", "float16 weights and compute, float32 I/O", _cli_export("onnx", "fp16"),
         product=True),
    Spec("onnx-int8-nbits8", "onnx", "int8", "MatMulNBits 8-bit, block 32, symmetric, accuracy_level 4 (int8 "
         "compute), lm_head and 8-bit embedding included", _cli_export("onnx", "int8"), product=True),
    Spec("onnx-int8-nbits8-acc0", "onnx", "int8", "MatMulNBits 8-bit, block 32, accuracy_level 0 (float compute)",
         _derived(_q_nbits(accuracy_level=0))),
    Spec("onnx-int8-nbits8-floathead", "onnx", "int8", "MatMulNBits 8-bit, block 32, accuracy_level 4, lm_head and "
         "embedding float", _derived(_q_nbits(exclude=("lm_head",), embedding=False))),
    Spec("onnx-int8-nbits8-b64", "onnx", "int8", "MatMulNBits 8-bit, block 64, accuracy_level 4",
         _derived(_q_recipe("nbits8-b64"))),
    Spec("onnx-int8-smooth-hybrid", "onnx", "int8", "SmoothQuant (alpha 0.75) + DynamicQuantizeMatMul on q/k/v/o/"
         "gate/up, MatMulNBits on down_proj and lm_head", _recipe("smooth-hybrid")),
    Spec("onnx-int8-dynamic", "onnx", "int8", "quantize_dynamic QInt8, per-tensor weights",
         _derived(_q_recipe("dynamic"))),
    Spec("onnx-int8-dynamic-pc", "onnx", "int8", "quantize_dynamic QInt8, per_channel=True",
         _derived(_q_dynamic_per_channel)),
    Spec("onnx-int8-dynamic-excl", "onnx", "int8", "quantize_dynamic QInt8 without lm_head and first/last down_proj",
         _derived(_q_recipe("dynamic-excl"))),
    Spec("gguf-f32", "gguf", "f32", "llama.cpp F32", _cli_export("gguf", "fp32"), product=True),
    Spec("gguf-f16", "gguf", "f16", "llama.cpp F16", _cli_export("gguf", "fp16"), product=True),
    Spec("gguf-q8_0", "gguf", "q8_0", "llama.cpp Q8_0", _cli_export("gguf", "q8_0"), product=True),
    Spec("gguf-q4_k_m", "gguf", "q4_k_m", "llama.cpp Q4_K_M", _cli_export("gguf", "q4_k_m"), product=True),
]}


# Left out of a default run to keep the accuracy phase near 45 minutes on this shared 2-core machine (each row
# takes 3-6 minutes here): dynamic-excl (its PPL is in quantize_int8's docstring: still +64 %), and on the pruned
# model the optimizer and per-channel quantize_dynamic rows (the dense rows answer those questions). Ask for them
# with --artifacts.
DEFAULT_SKIP = {"dense": {"onnx-int8-dynamic-excl"},
                "piem-lsps-30": {"onnx-int8-dynamic-excl", "onnx-fp32-opt", "onnx-int8-dynamic-pc"}}


def _valid(out: Path, spec: Spec) -> bool:
    model = out / ("model.onnx" if spec.fmt == "onnx" else "model.gguf")
    return (out / "manifest.json").is_file() and model.is_file()


def _ensure(ctx: Ctx, spec: Spec) -> tuple[Path, float | None]:
    out = ctx.artifact(spec.name)
    if _valid(out, spec):
        return out, None
    _log(f"  exporting {ctx.label}/{spec.name} -> {out.relative_to(ROOT)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    spec.build(ctx, out)
    return out, time.perf_counter() - t0


def _size_bytes(out: Path, fmt: str) -> int:
    if fmt == "gguf":
        return (out / "model.gguf").stat().st_size
    data = out / "model.onnx.data"
    return (out / "model.onnx").stat().st_size + (data.stat().st_size if data.exists() else 0)


# ---------------------------------------------------------------------------------------------------------------
# accuracy phase


class Model:
    """The PyTorch model and the evaluation windows of one checkpoint (loaded when first needed)."""

    def __init__(self, ctx: Ctx, text):
        self.ctx, self.text = ctx, text
        self._lm = self._ids = None

    @property
    def lm(self):
        if self._lm is None:
            from edgeprune.models import load

            self._lm = load(str(self.ctx.ckpt))
        return self._lm

    @property
    def ids(self) -> list[int]:
        if self._ids is None:
            from edgeprune.data import tokenize

            self._ids = tokenize(self.lm.tokenizer, self.text).tolist()
        return self._ids

    def protocol(self) -> dict:
        scored = self.ids[: TOKENS // SEQ_LEN * SEQ_LEN]
        return {"text": str(self.text.name), "text_sha256": self.text.sha256, "tokens_in_text": len(self.ids),
                "max_tokens": TOKENS, "seq_len": SEQ_LEN, "windows": len(scored) // SEQ_LEN,
                "token_ids_sha256": hashlib.sha256(json.dumps(scored).encode()).hexdigest()}

    def pytorch_ppl(self) -> dict:
        from edgeprune.evaluate.ppl import perplexity

        return perplexity(self.lm.model, self.lm.tokenizer, self.text, SEQ_LEN, max_tokens=TOKENS, progress=False)

    def runtime_ppl(self, out: Path, fmt: str) -> dict:
        if fmt == "onnx":
            from edgeprune.devices.ort_generate import OrtGenerator

            r = OrtGenerator(out).perplexity(self.ids, SEQ_LEN, max_tokens=TOKENS)
            return {**r, "runtime": "onnxruntime"}
        from edgeprune.export.gguf import gguf_perplexity

        r = gguf_perplexity(out / "model.gguf", self.text, SEQ_LEN, TOKENS, token_ids=self.ids)
        return {**r, "runtime": "llama.cpp"}


def _parity(p: dict | None) -> dict | None:
    if not p:
        return None
    keep = ("passed", "max_abs_logit_diff", "tolerance", "mean_kl", "kl_tolerance", "top1_agreement",
            "greedy_match", "greedy_agreement", "cache_match", "tokenizer_match")
    return {k: p[k] for k in keep if k in p}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _from_manifest(out: Path, spec: Spec) -> dict:
    """The row's fields that come from the artifact: size, parity, how it was made."""
    man = json.loads((out / "manifest.json").read_text())
    return {"dir": _rel(out), "size_mib": round(_size_bytes(out, spec.fmt) / 2**20, 2),
            "parity": _parity(man.get("parity")), "quantization": man.get("quantization"),
            "optimizer": man.get("optimizer"), "tensor_types": man.get("tensor_types")}


def build_pruned(data: Path) -> None:
    if (PRUNED / "manifest.json").is_file():
        return
    calib = data / "wikitext-2" / "tokens" / "valid.txt"
    cmd = [sys.executable, "-m", "edgeprune", *PRUNE_ARGS, "--calib", str(calib), "-o", str(PRUNED)]
    _log("+ " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, cwd=ROOT)


def accuracy(result: dict, rows: dict, labels: list[str], names: list[str], only: set | None, force: bool,
             data: Path, skip: dict) -> None:
    from edgeprune.data import load_text

    text = load_text(str(data / "wikitext-2" / "wiki.test.raw"))
    for label in labels:
        if label == "piem-lsps-30":
            build_pruned(data)
        keys = [f"{label}/{n}" for n in names if (only is None and n not in skip.get(label, ()))
                or f"{label}/{n}" in (only or ())]
        todo = [k for k in keys if force or k not in rows or "ppl" not in rows[k]]
        for k in set(keys) - set(todo):  # measured rows: refresh what the manifest says (cheap)
            spec = SPECS[k.split("/", 1)[1]]
            out = ART_DIR / label / spec.name
            if _valid(out, spec):
                rows[k].update(_from_manifest(out, spec))
        entry = result["models"].get(label) or {}
        if entry:
            entry.update(spec=MODELS[label], checkpoint=_rel(Path(entry["checkpoint"])))
        if not todo and "pytorch" in entry:
            continue
        ctx = Ctx(label, MODELS[label])
        model = Model(ctx, text)
        if "pytorch" not in entry or force and only is None:
            _log(f"{label}: PyTorch PPL on the first {TOKENS} tokens")
            ppl = model.pytorch_ppl()
            entry = {"spec": ctx.spec, "checkpoint": _rel(ctx.ckpt), "protocol": model.protocol(), "pytorch": ppl}
            result["models"][label] = entry
            _log(f"  PyTorch PPL {ppl['ppl']:.4f} ({ppl['seconds']:.0f} s)")
            _save(result, rows)
        for key in todo:
            spec = SPECS[key.split("/", 1)[1]]
            row = {"key": key, "model": label, "artifact": spec.name, "format": spec.fmt, "dtype": spec.dtype,
                   "path": spec.path, "product": spec.product, **{k: v for k, v in rows.get(key, {}).items()
                                                                   if k == "speed"}}
            _log(f"{key}")
            try:
                out, export_s = _ensure(ctx, spec)
                row.update(_from_manifest(out, spec))
                if export_s is not None:
                    row["export_s"] = round(export_s, 1)
                r = model.runtime_ppl(out, spec.fmt)
                ref = entry["pytorch"]["ppl"]
                row.update(runtime=r["runtime"], ppl=r["ppl"], nll=r["nll"], windows=r["windows"],
                           tokens_scored=r["tokens_scored"], eval_s=round(r["seconds"], 1), pytorch_ppl=ref,
                           delta_pct=100 * (r["ppl"] / ref - 1))
                row.pop("error", None)
                _log(f"  {r['runtime']} PPL {r['ppl']:.4f} (PyTorch {ref:.4f}, {row['delta_pct']:+.2f} %), "
                     f"{row['size_mib']} MiB, parity max|dlogit| "
                     f"{(row['parity'] or {}).get('max_abs_logit_diff', float('nan')):.3g}")
            except Exception as e:  # record the failure, keep going with the other rows
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                _log(f"  FAILED: {row['error']}")
                traceback.print_exc()
            rows[key] = row
            _save(result, rows)


# ---------------------------------------------------------------------------------------------------------------
# speed phase


def speed(result: dict, rows: dict, keys: list[str], force: bool, threads: str | None) -> None:
    from edgeprune.devices import profiles, ship

    load = os.getloadavg()[0]
    if load > QUIET_LOAD:
        _log(f"warning: load average {load:.2f} > {QUIET_LOAD}: the timings will include contention")
    prof = profiles.load("cpu")
    overrides = {"prompt_lengths": [SPEED_PROMPT], "new_tokens": SPEED_NEW_TOKENS, "repeats": SPEED_REPEATS,
                 "threads": threads}
    for key in keys:
        row = rows.get(key)
        if not row or "dir" not in row or (row.get("speed") and not force):
            continue
        _log(f"profiling {key}")
        try:
            doc = ship.profile_local(ROOT / row["dir"], prof, overrides, quiet=True)
        except Exception as e:
            row["speed"] = {"error": f"{type(e).__name__}: {e}"}
            _log(f"  FAILED: {row['speed']['error']}")
            _save(result, rows)
            continue
        pre = next(r for r in doc["prefill"] if r["prompt_tokens"] == SPEED_PROMPT)
        row["speed"] = {"prefill_ms": pre["prefill_ms"], "prefill_tokens_per_s": pre["prefill_tokens_per_s"],
                        "ttft_ms": pre["ttft_ms"], "decode_tokens_per_s": doc["decode"]["tokens_per_s"],
                        "decode_ms_p50": doc["decode"]["ms_per_token_p50"],
                        "decode_ms_p95": doc["decode"]["ms_per_token_p95"], "load_s": doc["load_s"],
                        "peak_rss_mb": doc["memory"]["peak_rss_mb"], "threads": doc["runtime"].get("threads"),
                        "load_avg": [doc["machine"].get("load_avg"), doc["machine"].get("load_avg_end")],
                        "warnings": doc.get("warnings", []), "date": doc["created"],
                        "settings": {k: doc["settings"][k] for k in ("prompt_lengths", "new_tokens",
                                                                     "decode_prompt_tokens", "warmup", "repeats")}}
        result["speed_machine"] = {k: doc["machine"].get(k) for k in ("cpu_model", "arch", "physical_cores",
                                                                      "logical_cores", "memory_total_mb")}
        _log(f"  prefill {pre['prefill_ms']:.1f} ms, decode {doc['decode']['tokens_per_s']} tok/s")
        _save(result, rows)


# ---------------------------------------------------------------------------------------------------------------


def _save(result: dict, rows: dict) -> None:
    order = {n: i for i, n in enumerate(SPECS)}
    labels = list(MODELS)
    result["rows"] = sorted(rows.values(), key=lambda r: (labels.index(r["model"]) if r["model"] in labels else 99,
                                                         order.get(r["artifact"], 99)))
    result["date"] = time.strftime("%Y-%m-%d")
    save(NAME, result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", action="store_true", help="speed phase only: profile the rows' artifacts")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--artifacts", help="comma-separated artifact names (default: all but DEFAULT_SKIP); "
                    + ", ".join(SPECS))
    ap.add_argument("--only", help="comma-separated row keys MODEL/ARTIFACT, e.g. dense/gguf-q8_0")
    ap.add_argument("--force", action="store_true", help="redo rows (and speed) already in the results")
    ap.add_argument("--threads", help="speed: override the cpu profile's threads")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="data directory (WikiText-2)")
    args = ap.parse_args()

    from edgeprune.export.onnx import DEFAULT_INT8

    labels = [m for m in args.models.split(",") if m]
    names = [n for n in (args.artifacts or ",".join(SPECS)).split(",") if n]
    skip = {} if args.artifacts else DEFAULT_SKIP
    for bad in [m for m in labels if m not in MODELS] + [n for n in names if n not in SPECS]:
        sys.exit(f"error: unknown model or artifact '{bad}'")
    only = set(args.only.split(",")) if args.only else None
    result = load_result(NAME) or {}
    rows = {r["key"]: r for r in result.get("rows", [])}
    result.update(schema="edgeprune.bench-export/1", default_int8=DEFAULT_INT8, int8_target_pct=INT8_TARGET_PCT,
                  float_tolerance_pct=FLOAT_TOLERANCE_PCT, tokens=TOKENS, seq_len=SEQ_LEN,
                  speed_settings={"prompt_tokens": SPEED_PROMPT, "new_tokens": SPEED_NEW_TOKENS,
                                  "repeats": SPEED_REPEATS, "device_profile": "cpu"})
    result.setdefault("models", {})
    result["specs"] = {n: {"format": s.fmt, "dtype": s.dtype, "path": s.path, "product": s.product}
                       for n, s in SPECS.items()}
    start = time.perf_counter()
    if args.speed:
        keys = [f"{m}/{n}" for m in labels for n in names if only is None or f"{m}/{n}" in only]
        speed(result, rows, keys, args.force, args.threads)
    else:
        accuracy(result, rows, labels, names, only, args.force, Path(args.data), skip)
    _save(result, rows)
    _log(f"wrote bench/results/{NAME}.json in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
