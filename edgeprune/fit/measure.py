"""Realising one configuration of ``edgeprune fit``: prune the checkpoint to a ratio with the recipe (reused when
the same settings were pruned before), export it, its PPL in the runtime, the dense model's PyTorch PPL (cached),
and the measured value of every target from a profile document. Does NOT choose anything (search.py, run.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from edgeprune.data import resolve_text
from edgeprune.fit import latency

if TYPE_CHECKING:
    from edgeprune.fit.run import FitOptions

# round 1's scores and sensitivities of the dense model, shared by every prune of this process (they do not
# depend on the ratio or the budget; prune_model keys them by everything they do depend on)
_SCORES: dict = {}


def log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def tag(ratio: float, budget: str = "params") -> str:
    return f"r{round(100 * ratio):02d}" + ("-latency" if budget == "latency" else "")


def prune_to(opts: FitOptions, ckpt: Path, ratio: float, pcfg_base, data: dict, out: Path) -> Path:
    """The checkpoint pruned to ``ratio`` with the recipe (reused when ``out`` holds the same settings)."""
    from dataclasses import replace

    if ratio == 0:
        return ckpt
    pcfg = replace(pcfg_base, ratio=ratio)
    model_dir = out / tag(ratio, opts.budget) / "model"
    want = asdict(pcfg)
    try:
        have = json.loads((model_dir / "manifest.json").read_text()).get("config")
    except (OSError, ValueError):
        have = None
    if have == json.loads(json.dumps(want)):
        log(f"reusing {model_dir} (same recipe and ratio)")
        return model_dir
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models import load
    from edgeprune.prune import prune_model

    log(f"pruning {opts.model} to ratio {ratio:.2f} ({pcfg.scorer} + {pcfg.allocator}, {pcfg.rounds} rounds, "
         f"refit {pcfg.reconstruct}, {pcfg.recover_steps} distillation steps, {opts.budget} budget)")
    lm = load(opts.model, **opts.load)
    record = prune_model(lm, pcfg, resolve_text(data.get("calib", "builtin"), "calib"), progress=False,
                         cache=_SCORES.setdefault(opts.model, {}))
    save_checkpoint(lm, model_dir, {"source_model": opts.model, "source": lm.source, **record})
    return model_dir


def export_to(model_dir: Path, fmt: str, dtype: str, out: Path) -> Path:
    from edgeprune.export.artifacts import export_artifact

    art = out / "artifact"
    try:
        src = json.loads((art / "manifest.json").read_text()).get("source")
    except (OSError, ValueError):
        src = None
    if src and Path(src).resolve() == Path(model_dir).resolve():
        return art
    log(f"exporting {model_dir} as {fmt} {dtype}")
    export_artifact(str(model_dir), fmt, {"f32": "fp32", "f16": "fp16"}.get(dtype, dtype), art)  # GGUF's names
    return art


def artifact_ppl(art: Path, fmt: str, text, ev: dict, max_tokens: int | None) -> float:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(art / "tokenizer.json")).encode(text.text, add_special_tokens=False).ids
    if fmt == "onnx":
        from edgeprune.devices.ort_generate import OrtGenerator

        return OrtGenerator(art, threads=ev.get("threads") or None).perplexity(
            ids, ev.get("seq_len", 128), max_tokens=max_tokens, batch_size=ev.get("batch_size", 8))["ppl"]
    from edgeprune.export.gguf import gguf_perplexity

    return gguf_perplexity(art / "model.gguf", text, ev.get("seq_len", 128), max_tokens, token_ids=ids,
                           n_threads=ev.get("threads") or None)["ppl"]


def dense_ppl(opts: FitOptions, text, ev: dict, max_tokens: int | None) -> float:
    """The dense model's PyTorch fp32 PPL on the same tokens (cached in the output directory)."""
    path = (opts.work or opts.out) / "dense_ppl.json"
    key = {"model": opts.model, "text": text.sha256, "seq_len": ev.get("seq_len", 128), "max_tokens": max_tokens,
           **({"load": opts.load} if opts.load else {})}
    try:
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            return cached["ppl"]
    except (OSError, ValueError, KeyError):
        pass
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.io import write_json
    from edgeprune.models import load

    lm = load(opts.model, **opts.load)
    ppl = perplexity(lm.model, lm.tokenizer, text, ev.get("seq_len", 128), max_tokens=max_tokens,
                     batch_size=ev.get("batch_size", 8), progress=False)["ppl"]
    write_json(path, {"key": key, "ppl": ppl})
    return ppl


def measured_values(doc: dict, prompt: int | None, ppl: float, ref_ppl: float) -> dict:
    """The measured value of every target. Speeds are the fastest repeat's, as in the latency table (medians
    beside them)."""
    ttft = latency.best_ttft_ms(doc)
    median_ttft = {r["prompt_tokens"]: r["ttft_ms"] for r in doc["prefill"]}
    return {"memory_mb": doc["memory"]["peak_rss_mb"], "memory_check_mb": doc["memory_check"]["estimate_mb"],
            "size_mb": round(doc["artifact"]["size_bytes"] / 2**20, 3),
            "decode_tok_s": latency.best_decode_tok_s(doc), "decode_tok_s_median": doc["decode"]["tokens_per_s"],
            "ttft_ms": ttft.get(prompt) if prompt else None,
            "ttft_ms_median": median_ttft.get(prompt) if prompt else None,
            "ppl": round(ppl, 3), "ppl_ratio": round(ppl / ref_ppl, 4),
            "load_avg": [doc["machine"].get("load_avg"), doc["machine"].get("load_avg_end")]}
