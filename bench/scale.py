"""Wall time and peak memory of score + prune (in memory and streamed), of export (ONNX int8, GGUF q8_0) and of
profiling the GGUF with llama.cpp, against model size.

Models: Llama-shaped random-initialised checkpoints (written layer by layer, never resident: see ``make_random``)
of about 135M, 0.5B, 1.1B and 3B parameters, and the real default model. Random weights generate garbage text;
that does not matter for memory and speed, which depend on the shapes only. Each measurement runs in its own
process; peak RSS is that process's own VmHWM, recorded with its RSS after the imports (torch, transformers,
accelerate, edgeprune and the architecture's modeling code: the baseline the targets are checked above) and, for
the prune modes, the peak of the scoring pass alone. Recipe (``RECIPE``): PIEM + LSPS (Block Influence), ratio 0.2,
PruneConfig's default 3 rounds (``--rounds``) and least-squares refit, 8 calibration windows of 128 tokens of the
built-in text; the in-memory path computes PIEM's gradient term with the hook-based Taylor pass
(edgeprune.scoring.gradients), the streamed path its default (stream_prune.DEFAULT_GRADIENT). Modes:

- ``memory``: ``load(dtype=)`` + ``prune_model`` + ``save_checkpoint``; ``stream``: ``stream_prune``;
- ``export``: ONNX int8 of the pruned checkpoint (parity check included);
- ``gguf``: what ``python -m edgeprune export PRUNED --format gguf --dtype q8_0`` does (export_gguf_artifact,
  parity check included), except that a failed check keeps the file: random weights give near-flat logits whose
  top-1 flips at near-ties under q8_0 (a 3B one agreed on 83% of positions, the real-model bound is 85%);
- ``profile``: ``python -m edgeprune profile GGUF --device cpu`` with a short setting (prompt 32, 16 new tokens,
  one repeat, no warm-up, 2 threads): TTFT, decode tokens/s and the profiler's own peak RSS;
- ``e2e``: ``stream,gguf,profile`` (prune -> GGUF q8_0 -> profile; ``--e2e-prune memory`` prunes in memory).

The export modes take the in-memory pruned checkpoint when that mode ran for the size, else the streamed one.

    .venv/bin/python bench/scale.py [--sizes default,135m,0.5b] [--dtype bfloat16] [--modes memory,stream,export]
    .venv/bin/python bench/scale.py --sizes 3b --dtype bfloat16 --modes e2e --work DIR

Writes bench/results/scale.json (rows merged by size, mode and dtype), bench/results/scale.md (tables and the
extrapolation) and bench/results/scale.png (plot); every row records the load average (the machine is shared:
times are wall clock under that load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save  # noqa: E402

# Llama-shaped configs; the names say the parameter count, the shapes follow well-known models of that size
SIZES = {
    "smoke": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),  # checks the bench itself
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),  # SmolLM2-135M
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),  # Qwen2.5-0.5B
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),  # TinyLlama-1.1B
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),  # Llama-3.2-3B
}

# shapes to extrapolate to: (hidden, intermediate, layers, heads, kv heads, vocab, tied)
KNOWN = {"Llama-3.2-3B": (3072, 8192, 28, 24, 8, 128256, True), "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128256, False),
         "Qwen2.5-14B": (5120, 13824, 48, 40, 8, 152064, False), "Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128256, False)}
BUDGETS = {"24 GiB RAM": 24 * 2**30, "80 GiB GPU": 80 * 2**30}
PRUNE_MODES = ("memory", "stream")
RECIPE = ("PIEM + LSPS (bi sensitivity), ratio 0.2, PruneConfig's other defaults (least-squares refit; 3 rounds "
          "unless a row says otherwise), 8 x 128 calibration tokens of the built-in text")
EXPORT_MODES = ("export", "gguf", "profile")
PROFILE_ARGS = ["--device", "cpu", "--threads", "2", "--prompt-lengths", "32", "--decode-prompt", "32",
                "--new-tokens", "16", "--repeats", "1", "--warmup", "0", "--quiet"]

HWM = """
def hwm_mib():  # this process's own peak RSS: getrusage would include the spawning parent's (vfork + exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
"""

CHILD = HWM + r"""
import json, sys, time
from pathlib import Path

def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

PEAK, SCORE = [0.0], [0.0]

def reset():  # fold the peak so far into PEAK and start a new one (Linux: clear_refs 5 resets VmHWM)
    PEAK[0] = max(PEAK[0], hwm_mib())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def scoring(owner, name):  # record the peak RSS while owner.name runs (the scoring pass) apart
    fn = getattr(owner, name)
    def wrapped(*a, **k):
        reset()
        try:
            return fn(*a, **k)
        finally:
            SCORE[0] = max(SCORE[0], hwm_mib())
            reset()
    setattr(owner, name, wrapped)

import importlib
import torch, transformers, accelerate, safetensors.torch  # noqa: F401
import edgeprune.checkpoint, edgeprune.models, edgeprune.prune, edgeprune.stream_prune  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from edgeprune.data import load_text
from edgeprune.prune import PruneConfig
mode, src, out, dtype, rounds = sys.argv[1:6]
config = Path(src) / "config.json"
arch = json.loads(config.read_text()).get("model_type", "") if config.is_file() else ""
try:  # the architecture's modeling code, which transformers imports lazily (~0.1 GiB for Llama)
    importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
except ImportError:
    pass
imports = rss_mib()  # the baseline: this process after the imports, before any model is read
t = time.perf_counter()
cfg = PruneConfig(ratio=0.2, scorer="piem", allocator="lsps", sensitivity="bi", n_samples=8, seq_len=128,
                  rounds=int(rounds))
text = load_text("builtin", "calib")
res = {"imports_rss_mib": imports}
if mode == "baseline":
    pass
elif mode == "memory":
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models import load
    from edgeprune.prune import prune_model
    scoring(edgeprune.prune, "score_model")
    lm = load(src, dtype=dtype)
    res["load_seconds"] = time.perf_counter() - t
    res["load_rss_mib"] = hwm_mib()
    rec = prune_model(lm, cfg, text, progress=False)
    save_checkpoint(lm, out, {})
    res["params_after"] = rec.get("params_after")
elif mode == "stream":
    from edgeprune.stream_prune import stream_prune
    scoring(edgeprune.stream_prune, "stream_score")
    rec = stream_prune(src, cfg, text, out, dtype=dtype, progress=False)
    res["params_after"] = rec.get("params_after")
else:
    from edgeprune.export.onnx import export_onnx
    rec = export_onnx(src, out, "int8")
    res["parity_passed"] = rec["parity"]["passed"]
reset()
res.update(seconds=time.perf_counter() - t, peak_rss_mib=PEAK[0])
if SCORE[0]:
    res["score_peak_rss_mib"] = SCORE[0]
print(json.dumps(res))
"""

# runs `python -m edgeprune ARGS...` in this process and reports its own wall time and VmHWM on exit (atexit also
# runs after typer's sys.exit)
CLI_CHILD = HWM + r"""
import atexit, json, runpy, sys, time
t = time.perf_counter()
report = sys.argv[1]

def done():
    with open(report, "w") as f:
        json.dump({"seconds": time.perf_counter() - t, "peak_rss_mib": hwm_mib()}, f)

atexit.register(done)
sys.argv = ["edgeprune", *sys.argv[2:]]
runpy.run_module("edgeprune", run_name="__main__", alter_sys=True)
"""


# export_gguf_artifact as the CLI runs it, keeping a file whose parity check failed (see the module docstring)
GGUF_CHILD = HWM + r"""
import json, sys, time
from pathlib import Path
t = time.perf_counter()
from edgeprune.export.artifacts import export_gguf_artifact
export_gguf_artifact(Path(sys.argv[2]), Path(sys.argv[3]), "q8_0", require_parity=False)
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": time.perf_counter() - t, "peak_rss_mib": hwm_mib()}, f)
"""


def make_random(name: str, out: Path, dtype: str = "float32") -> Path:
    """A random-initialised Llama checkpoint of size ``name`` written one decoder layer at a time (normal(0, 0.02)
    weights, unit norms), with the byte-level tokenizer of the tiny test models."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeprune.models.tiny import byte_tokenizer
    from edgeprune.streaming import DTYPES, LayerShardWriter

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = byte_tokenizer()
    config = AutoConfig.for_model("llama", **SIZES[name], max_position_embeddings=2048, rms_norm_eps=1e-5,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    tdtype = DTYPES[dtype]

    def fill(prefix: str, module) -> dict:
        out = {}
        for n, p in module.named_parameters():
            t = torch.ones(p.shape) if p.dim() == 1 else torch.empty(p.shape).normal_(0, 0.02, generator=gen)
            out[prefix + n] = t.to(tdtype)
        return out

    layers = model.model.layers
    writer = LayerShardWriter(tmp, len(layers) + 1)
    for i, layer in enumerate(layers):
        writer.add(fill(f"model.layers.{i}.", layer))
    rest = {"model.embed_tokens.": model.model.embed_tokens, "model.norm.": model.model.norm}
    if not config.tie_word_embeddings:
        rest["lm_head."] = model.lm_head
    writer.add({k: v for p, m in rest.items() for k, v in fill(p, m).items()})
    writer.finish()
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def params_of(src: Path) -> dict:
    """Parameters and bytes of a checkpoint (from its safetensors headers), split into layers and the rest."""
    from safetensors import safe_open

    from edgeprune.streaming import tensor_files

    n_layer, n_rest, layers = 0, 0, set()
    for name, file in tensor_files(src).items():
        with safe_open(str(file), framework="pt") as f:
            shape = f.get_slice(name).get_shape()
        n = 1
        for d in shape:
            n *= d
        if ".layers." in name:
            n_layer += n
            layers.add(int(name.split(".layers.")[1].split(".")[0]))
        else:
            n_rest += n
    return {"params": n_layer + n_rest, "layer_params": n_layer // max(len(layers), 1), "rest_params": n_rest,
            "layers": len(layers)}


def _error(stderr: str) -> str:
    return (stderr.strip().splitlines() or ["?"])[-1][:200]


def run(mode: str, src: Path, out: Path, dtype: str, timeout: int, rounds: int = 3) -> dict:
    """One measurement in a child process (see CHILD)."""
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), dtype, str(rounds)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if proc.returncode:
        return {"error": _error(proc.stderr)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(args: list[str], timeout: int, child: str = CLI_CHILD) -> dict:
    """``python -m edgeprune ARGS`` (or another ``child`` taking the report path first) in a child process: its
    wall time and its own peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        try:
            proc = subprocess.run([sys.executable, "-c", child, report.name, *args], capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"over {timeout} s"}
        if proc.returncode:
            return {"error": _error(proc.stderr)}
        return json.loads(Path(report.name).read_text())


def gguf_export(pruned: Path, out: Path, timeout: int) -> dict:
    res = run_cli([str(pruned), str(out)], timeout, GGUF_CHILD)
    manifest = out / "manifest.json"
    if "error" not in res and manifest.is_file():
        info = json.loads(manifest.read_text())
        parity = info.get("parity") or {}
        res.update(gguf_bytes=(out / "model.gguf").stat().st_size, parity_passed=parity.get("passed"),
                   parity_top1=parity.get("top1_agreement"), parity_mean_kl=parity.get("mean_kl"))
    return res


def gguf_profile(artifact: Path, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        doc_path = Path(tmp) / "profile.json"
        res = run_cli(["profile", str(artifact), *PROFILE_ARGS, "--json", str(doc_path)], timeout)
        if "error" in res or not doc_path.is_file():
            return res
        doc = json.loads(doc_path.read_text())
    prefill = doc["prefill"][0]
    # the row's peak is the profiler's own (a fresh process that `edgeprune profile` starts), not the CLI's
    res.update(cli_peak_rss_mib=res["peak_rss_mib"], peak_rss_mib=doc["memory"]["peak_rss_mb"], load_s=doc["load_s"],
               ttft_ms=prefill["ttft_ms"], prompt_tokens=prefill["prompt_tokens"],
               decode_tokens_per_s=doc["decode"]["tokens_per_s"], new_tokens=doc["decode"]["new_tokens"],
               threads=doc["runtime"].get("threads"), profile_settings=doc["settings"])
    return res

def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def above_imports(r: dict) -> float:
    """A row's peak RSS above its own process's RSS after the imports (torch, transformers, edgeprune), in bytes;
    rows measured before that baseline was recorded count the whole process."""
    return (r["peak_rss_mib"] - r.get("imports_rss_mib", 0.0)) * 2**20


def target_of(r: dict) -> tuple[str, bool | None]:
    """The issue's target for a row and whether the measured peak above the imports meets it (the whole prune's
    peak: scoring, sensitivity, allocation, surgery and refit, saving)."""
    peak = above_imports(r)
    if r["mode"] == "memory":
        return f"≤ {_gib(1.3 * r['model_bytes'])} (1.3x model)", peak <= 1.3 * r["model_bytes"]
    if r["mode"] == "stream":
        return f"≤ {_gib(r['stream_target'])} (3 layers + embeddings)", peak <= r["stream_target"]
    return "", None


def table(rows: list[dict]) -> str:
    head = ("| model | params | dtype | model GiB | mode | seconds | peak RSS GiB (process) | after imports GiB | "
            "peak above imports GiB | scoring peak above imports GiB | above imports / model | target GiB | met | "
            "notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    order = {m: i for i, m in enumerate(PRUNE_MODES + EXPORT_MODES)}
    for r in sorted((r for r in rows if r["mode"] in order),
                    key=lambda r: (r["params"], r["dtype"], order[r["mode"]])):
        gib = r["model_bytes"] / 2**30
        first = f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['dtype']} | {gib:.2f} | {r['mode']} | "
        if "error" in r:
            lines.append(first + f"- | - | - | - | - | - | - | - | {r['error']} |")
            continue
        peak = r["peak_rss_mib"] / 1024
        imports = f"{r['imports_rss_mib'] / 1024:.2f}" if "imports_rss_mib" in r else "-"
        above = f"{above_imports(r) / 2**30:.2f}" if "imports_rss_mib" in r else "-"
        ratio = f"{above_imports(r) / r['model_bytes']:.2f}" if "imports_rss_mib" in r else "-"
        score = (f"{(r['score_peak_rss_mib'] - r['imports_rss_mib']) / 1024:.2f}"
                 if "score_peak_rss_mib" in r and "imports_rss_mib" in r else "-")
        target, met = target_of(r)
        notes = []
        if r["mode"] in PRUNE_MODES and "score_peak_rss_mib" in r and "imports_rss_mib" in r:
            limit = 1.3 * r["model_bytes"] if r["mode"] == "memory" else r["stream_target"]
            ok = (r["score_peak_rss_mib"] - r["imports_rss_mib"]) * 2**20 <= limit
            notes.append(f"scoring alone {'meets' if ok else 'misses'} the target")
        if r["mode"] in PRUNE_MODES and "imports_rss_mib" not in r:
            notes.append("measured before the imports baseline was recorded: whole-process peak")
        if r["mode"] == "gguf":
            notes.append(f"q8_0 file {_gib(r.get('gguf_bytes', 0))} GiB, parity "
                         + ("passed" if r.get("parity_passed") else
                            f"failed on top-1 agreement {r.get('parity_top1', 0):.2f} (random weights' near-flat "
                            f"logits; mean KL {r.get('parity_mean_kl', 0):.4f}), file kept"))
        if r["mode"] == "export":
            notes.append(f"ONNX int8, parity {'passed' if r.get('parity_passed') else 'FAILED'}")
        if r["mode"] == "profile":
            notes.append(f"peak RSS is the profiler process's own; TTFT {r['ttft_ms']:.0f} ms, decode "
                         f"{r['decode_tokens_per_s']:.2f} tok/s")
        if r.get("from"):
            notes.append("of the dense checkpoint (not pruned)" if r["from"].startswith("dense") else
                         f"of the {r['from']}-pruned checkpoint")
        if r["mode"] in PRUNE_MODES:
            notes.append(f"{r.get('rounds', 3)} rounds")
        if r.get("note"):  # added by hand to a stored row (e.g. which code it measured)
            notes.append(r["note"])
        notes.append(f"load {r['load_average'][0]:.1f}")
        lines.append(first + f"{r['seconds']:.0f} | {peak:.2f} | {imports} | {above} | {score} | {ratio} | {target} | "
                     f"{'' if met is None else ('yes' if met else '**no**')} | {'; '.join(notes)} |")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    pts = [r for r in rows if r["mode"] == "profile" and "error" not in r]
    if not pts:
        return ""
    lines = ["| model | dtype of the pruned checkpoint | GGUF | threads | TTFT ms (prompt 32) | decode tok/s "
             "(16 tokens) | load s | profiler peak RSS GiB | load average |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(pts, key=lambda r: r["params"]):
        lines.append(f"| {r['size']} | {r['dtype']} | q8_0 | {r.get('threads') or 2} | {r['ttft_ms']:.0f} | "
                     f"{r['decode_tokens_per_s']:.2f} | {r['load_s']:.1f} | {r['peak_rss_mib'] / 1024:.2f} | "
                     f"{r['load_average'][0]:.1f} |")
    return ("llama.cpp profile of the pruned q8_0 GGUF (`edgeprune profile --device cpu`, prompt 32, 16 new tokens, "
            "one repeat, no warm-up; random weights, so the text is garbage but the speed is the shape's):\n\n"
            + "\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in PRUNE_MODES + ("export", "gguf"):
        pts = sorted((r["params"] / 1e6, r["peak_rss_mib"] / 1024, r["seconds"]) for r in rows
                     if r["mode"] == mode and "error" not in r)
        if pts:
            x, mem, sec = zip(*pts, strict=True)
            axes[0].plot(x, mem, "o-", label=mode)
            axes[1].plot(x, sec, "o-", label=mode)
    pts = sorted({(r["params"] / 1e6, r["model_bytes"] / 2**30) for r in rows if r["mode"] in PRUNE_MODES + ("gguf",)})
    if pts:
        axes[0].plot(*zip(*pts, strict=True), "kx--", label="model bytes (working dtype)")
    axes[0].set(xlabel="parameters (M)", ylabel="peak RSS (GiB)", title="peak memory", xscale="log", yscale="log")
    axes[1].set(xlabel="parameters (M)", ylabel="wall seconds", title="wall time (shared 2-core machine)",
                xscale="log", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def shape_params(hidden, inter, layers, heads, kv, vocab, tied) -> tuple[int, int]:
    """(parameters outside the layers, parameters of one layer) of a Llama-shaped model."""
    d = hidden // heads
    layer = hidden * d * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + hidden, layer


def _x(mode: str, rest: int, layer: int, layers: int, width: int) -> int:
    """What a mode's memory scales with: the model's bytes in the working dtype (memory, and the exports, whose
    parity check loads the model), the resident part plus one layer (stream)."""
    return (rest + layer) * width if mode == "stream" else (rest + layers * layer) * width


def fits(rows: list[dict]) -> dict:
    """Per mode: peak RSS = a + b * x (a: the rows' RSS after their imports, or the baseline row's peak for rows
    without one; b: least squares of the peaks above a through 0, so the largest rows weigh most; x: see ``_x``)
    and seconds = c * parameters (least squares through 0, at the load averages of the measured rows)."""
    base = [r for r in rows if r["mode"] == "baseline" and "error" not in r]
    if not base:
        return {}
    base_mib = base[-1]["peak_rss_mib"]
    out = {}
    for mode in PRUNE_MODES + ("gguf",):
        pts = [r for r in rows if r["mode"] == mode and "error" not in r and r["size"] != "smoke"]
        if not pts:
            continue
        # a row's own RSS after its imports where it recorded one (the prune modes), else the baseline row's
        a = max(r.get("imports_rss_mib", base_mib) for r in pts) * 2**20
        xs = [_x(mode, r["rest_params"], r["layer_params"], r["layers"], r["model_bytes"] // r["params"])
              for r in pts]
        ys = [(r["peak_rss_mib"] - r.get("imports_rss_mib", base_mib)) * 2**20 for r in pts]
        b = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
        c = sum(r["params"] * r["seconds"] for r in pts) / sum(r["params"] ** 2 for r in pts)
        out[mode] = {"a": a, "b": b, "c": c, "rows": [r["size"] for r in pts],
                     "load": [round(r["load_average"][0], 1) for r in pts]}
    return out


def extrapolate(rows: list[dict]) -> str:
    """Predicted peak RSS and time of the known shapes in bfloat16 from ``fits``. Extrapolated, not measured."""
    model = fits(rows)
    if not model:
        return ""
    out = ["| mode | fit: peak GiB | fit: seconds | " + " | ".join(KNOWN) + " |", "|---|---|---|" + "---|" * len(KNOWN)]
    for mode, f in model.items():
        cells = []
        for shape in KNOWN.values():
            rest, layer = shape_params(*shape)
            peak = f["a"] + f["b"] * _x(mode, rest, layer, shape[2], 2)
            verdict = ", ".join(f"{name.split()[0]}: {'fits' if peak <= budget else 'over'}"
                                for name, budget in BUDGETS.items() if mode != "stream" or "GPU" not in name)
            minutes = f["c"] * (rest + shape[2] * layer) / 60
            cells.append(f"{peak / 2**30:.1f} GiB ({verdict}); ~{minutes:.0f} min")
        x = "model bytes" if mode != "stream" else "(embeddings + head + one layer) bytes"
        out.append(f"| {mode} (from {', '.join(f['rows'])}) | {f['a'] / 2**30:.2f} + {f['b']:.2f} x {x} | "
                   f"{f['c'] * 1e9:.0f} s per 1B params | " + " | ".join(cells) + " |")
    return ("Extrapolated, **not measured**: peak RSS and wall time of the known shapes in bfloat16 from a linear "
            "fit of the measured rows (peak = process baseline + b x; seconds proportional to the parameters, at "
            "the measured rows' load averages; the gguf row is the export with its parity check). The 80 GiB "
            "column assumes the GPU holds what the CPU process held (no GPU was measured); the streamed path runs "
            "on the CPU only:\n\n" + "\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="default,135m,0.5b")
    ap.add_argument("--dtype", default="bfloat16", help="working dtype of the random models and both prune modes")
    ap.add_argument("--modes", default="memory,stream,export",
                    help="comma-separated: memory, stream, export, gguf, profile, e2e (= stream,gguf,profile)")
    ap.add_argument("--e2e-prune", default="stream", choices=PRUNE_MODES, help="the prune step of e2e")
    ap.add_argument("--work", default=None, help="where the checkpoints go (default: a temp directory)")
    ap.add_argument("--pruned", default=None, help="an already pruned checkpoint of the (one) size for the export "
                    "modes (e.g. one round's output of an interrupted run); recorded as the rows' 'from' (its "
                    "directory name; a name starting with 'dense' marks the dense checkpoint)")
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoints in --work for a later run")
    ap.add_argument("--rounds", type=int, default=3, help="prune rounds (PruneConfig's default: 3)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--drop", default=None, help="only remove the rows of these SIZE:DTYPE pairs (comma-separated; "
                    "stale measurements) from scale.json and rewrite the tables, then exit")
    args = ap.parse_args()
    if args.drop:
        gone = {tuple(x.split(":", 1)) for x in args.drop.split(",")}
        kept = [r for r in json.loads((RESULTS / "scale.json").read_text())["rows"]
                if (r["size"], r["dtype"]) not in gone]
        print(publish([], kept))
        return
    from edgeprune.streaming import source_dir

    modes = []
    for m in args.modes.split(","):
        for x in ([args.e2e_prune, "gguf", "profile"] if m == "e2e" else [m]):
            if x not in PRUNE_MODES + EXPORT_MODES:
                ap.error(f"unknown mode {x}")
            if x not in modes:
                modes.append(x)
    previous = json.loads((RESULTS / "scale.json").read_text())["rows"] if (RESULTS / "scale.json").is_file() else []
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        rows.append({"size": "-", "mode": "baseline", "dtype": "-", "params": 0, "model_bytes": 0,
                     "load_average": os.getloadavg(), **run("baseline", Path(tmp), Path(tmp), "float32", 600)})
        for size in [s for s in args.sizes.split(",") if s]:
            dtype = args.dtype
            src = source_dir("default") if size == "default" else make_random(size, Path(args.work or tmp) / size,
                                                                               dtype)
            info = params_of(src)
            width = 2 if dtype != "float32" else 4
            base = {"size": size, "dtype": dtype, **info, "model_bytes": info["params"] * width,
                    "stream_target": (info["rest_params"] + 3 * info["layer_params"]) * width}
            pruned = {m: Path(tmp) / f"{size}-{m}" for m in PRUNE_MODES}
            if args.pruned:
                pruned = {Path(args.pruned).name: Path(args.pruned)}
            for mode in modes:
                done = [m for m in pruned if (pruned[m] / "config.json").is_file()]
                start = os.getloadavg()
                if mode in PRUNE_MODES:
                    res = {"rounds": args.rounds, **run(mode, src, pruned[mode], dtype, args.timeout, args.rounds)}
                elif not done:
                    continue
                elif mode == "export":
                    res = {"from": done[0], **run(mode, pruned[done[0]], Path(tmp) / f"{size}-onnx", dtype,
                                                  args.timeout)}
                elif mode == "gguf":
                    res = {"from": done[0], **gguf_export(pruned[done[0]], Path(tmp) / f"{size}-gguf", args.timeout)}
                else:
                    if not (Path(tmp) / f"{size}-gguf" / "model.gguf").is_file():
                        continue
                    res = {"from": done[0], **gguf_profile(Path(tmp) / f"{size}-gguf", args.timeout)}
                rows.append({**base, "mode": mode, "load_average": start, "load_average_end": os.getloadavg(), **res})
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
                publish(previous, rows)
            if size != "default" and not args.keep:
                shutil.rmtree(Path(args.work or tmp) / size, ignore_errors=True)
    print(publish(previous, rows))


def scale_section(doc: dict) -> list[str]:
    """The BENCHMARKS.md section (bench/report.py) from bench/results/scale.json."""
    rows = doc["rows"]
    return ["## Scale: memory and time against model size (`bench/scale.py`)", "",
            "Llama-shaped random-initialised checkpoints (random weights: garbage text, but memory and speed "
            "depend on the shapes only), bfloat16 working dtype, one process per row (peak RSS = its own VmHWM). "
            f"Recipe: {doc['recipe']}. Targets from the issue: scoring peak RSS ≤ 1.3x the model's bytes in memory "
            "mode, ≤ 3 layers + embeddings streamed. They are checked against the peak **above the process's RSS "
            "after its imports** (torch, transformers, accelerate, edgeprune and the architecture's modeling code, "
            "before any model is read: the 'after imports' column, measured in the same process), and against the "
            "whole prune's peak (scoring, sensitivity, "
            "allocation, surgery and refit, saving), which is stricter than scoring alone; the notes say whether "
            "the scoring pass alone (`score_model` / `stream_score`) meets it. The whole-process peak is the first "
            "peak column. Seconds are wall clock on 2 shared cores under the load average in the notes. Plot: "
            "bench/results/scale.png.", "", table(rows), "", profile_table(rows),
            extrapolate(rows)]


def publish(previous: list[dict], rows: list[dict]) -> str:
    """Merge the new rows into bench/results/scale.json (replacing rows of the same size, mode and dtype) and
    rewrite the tables and the plot; called after every measurement, so an interrupted run keeps its rows."""
    new = {(x["size"], x["mode"], x["dtype"]) for x in rows}
    rows = [r for r in previous if (r["size"], r["mode"], r["dtype"]) not in new] + rows
    rows = [r for r in rows if r["size"] != "smoke"]  # the smoke size checks the script, it is not a result
    save("scale", {"rows": rows, "recipe": RECIPE,
                   "profile_args": PROFILE_ARGS, "fits": fits(rows)})
    text = "\n".join(scale_section({"rows": rows, "recipe": RECIPE})[4:])
    (RESULTS / "scale.md").write_text(text)
    plot(rows, RESULTS / "scale.png")
    return text


if __name__ == "__main__":
    main()
