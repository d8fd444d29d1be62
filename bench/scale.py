"""Wall time and peak memory of score + prune (in memory and streamed) and of ONNX export against model size.

Models: Llama-shaped random-initialised checkpoints (written layer by layer, never resident: see ``make_random``)
of about 135M, 0.5B, 1.1B and 3B parameters, and the real default model. Each measurement runs in its own process;
peak RSS is that process's VmHWM. Recipe: PIEM + LSPS (Block Influence), ratio 0.2, one round, 8
calibration windows of 128 tokens of the built-in text, no refit; the in-memory path computes PIEM's exact
gradient term, the streamed path its default (stream_prune.DEFAULT_GRADIENT). Export: ONNX int8 of the pruned
in-memory checkpoint, parity check included.

    .venv/bin/python bench/scale.py [--sizes default,135m,0.5b] [--dtype float32] [--modes memory,stream,export]

Writes bench/results/scale.json, bench/results/scale.md (table) and bench/results/scale.png (plot); prints the
table with the load average (the machine is shared: times are wall clock under that load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save  # noqa: E402

# Llama-shaped configs; the names say the parameter count, the shapes follow well-known models of that size
SIZES = {
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
BUDGET = 24 * 2**30

CHILD = r"""
import json, sys, time

def hwm_mib():  # this process's own peak RSS: getrusage would include the spawning parent's (vfork + exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

from pathlib import Path
from edgeprune.data import load_text
from edgeprune.prune import PruneConfig
mode, src, out, dtype = sys.argv[1:5]
t = time.perf_counter()
cfg = PruneConfig(ratio=0.2, scorer="piem", allocator="lsps", sensitivity="bi", n_samples=8, seq_len=128)
text = load_text("builtin", "calib")
res = {}
if mode == "baseline":
    import torch, transformers, edgeprune.stream_prune, edgeprune.prune  # noqa: F401
elif mode == "memory":
    import torch
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models import load
    from edgeprune.prune import prune_model
    try:
        lm = load(src, dtype=dtype)
    except TypeError:  # a loader without the dtype option: float32 only
        if dtype != "float32":
            raise SystemExit("this loader has no dtype option")
        lm = load(src)
    res["load_seconds"] = time.perf_counter() - t
    rec = prune_model(lm, cfg, text, progress=False)
    save_checkpoint(lm, out, {})
elif mode == "stream":
    from edgeprune.stream_prune import stream_prune
    rec = stream_prune(src, cfg, text, out, dtype=dtype, progress=False)
else:
    from edgeprune.export.onnx import export_onnx
    rec = export_onnx(src, out, "int8")
    res["parity_passed"] = rec["parity"]["passed"]
res.update(seconds=time.perf_counter() - t, peak_rss_mib=hwm_mib())
print(json.dumps(res))
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
    tmp.mkdir(parents=True, exist_ok=True)
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


def run(mode: str, src: Path, out: Path, dtype: str, timeout: int) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), dtype], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| model | params | dtype | model GiB | mode | seconds | peak RSS GiB | peak / model | target |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if r["mode"] == "baseline":
            continue
        gib = r["model_bytes"] / 2**30
        if "error" in r:
            lines.append(f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['dtype']} | {gib:.2f} | {r['mode']} | "
                         f"- | - | - | {r['error']} |")
            continue
        peak = r["peak_rss_mib"] / 1024
        target = {"memory": f"≤ {1.3 * gib:.2f} (1.3x)", "stream": f"≤ {r['stream_target'] / 2**30:.2f} "
                  "(3 layers + embeddings)"}.get(r["mode"], "")
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['dtype']} | {gib:.2f} | {r['mode']} | "
                     f"{r['seconds']:.0f} | {peak:.2f} | {peak / gib:.2f} | {target} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("memory", "stream", "export"):
        pts = sorted((r["params"] / 1e6, r["peak_rss_mib"] / 1024, r["seconds"]) for r in rows
                     if r["mode"] == mode and "error" not in r)
        if pts:
            x, mem, sec = zip(*pts, strict=True)
            axes[0].plot(x, mem, "o-", label=mode)
            axes[1].plot(x, sec, "o-", label=mode)
    pts = sorted((r["params"] / 1e6, r["model_bytes"] / 2**30) for r in rows if r["mode"] == "memory")
    if pts:
        axes[0].plot(*zip(*pts, strict=True), "k--", label="model bytes")
    axes[0].set(xlabel="parameters (M)", ylabel="peak RSS (GiB)", title="peak memory")
    axes[1].set(xlabel="parameters (M)", ylabel="wall seconds", title="wall time (shared 2-core machine)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def shape_params(hidden, inter, layers, heads, kv, vocab, tied) -> tuple[int, int]:
    """(parameters outside the layers, parameters of one layer) of a Llama-shaped model."""
    d = hidden // heads
    layer = hidden * d * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + hidden, layer


def extrapolate(rows: list[dict]) -> str:
    """Fit peak RSS = a + b * x per mode (a: the measured RSS of a process that has imported torch, transformers
    and edgeprune; b: the mean of (peak - a) / x over the measured rows; x: the model's bytes in memory mode, the
    bytes of the non-layer part plus one layer in streaming mode) and predict known shapes in bfloat16.
    Extrapolated, not measured."""
    base = [r for r in rows if r["mode"] == "baseline" and "error" not in r]
    if not base:
        return ""
    a = base[-1]["peak_rss_mib"] * 2**20
    out = ["| mode | fit (GiB) | " + " | ".join(KNOWN) + " |", "|---|---|" + "---|" * len(KNOWN)]
    for mode in ("memory", "stream"):
        pts = [r for r in rows if r["mode"] == mode and "error" not in r]
        if not pts:
            continue
        width = {r["size"]: (2 if r["dtype"] != "float32" else 4) for r in pts}
        xs = [r["model_bytes"] if mode == "memory" else (r["rest_params"] + r["layer_params"]) * width[r["size"]]
              for r in pts]
        b = sum((r["peak_rss_mib"] * 2**20 - a) / x for r, x in zip(pts, xs, strict=True)) / len(pts)
        cells = []
        for shape in KNOWN.values():
            rest, layer = shape_params(*shape)
            x = 2 * (rest + shape[2] * layer) if mode == "memory" else 2 * (rest + layer)
            peak = a + b * x
            cells.append(f"{peak / 2**30:.1f} {'fits' if peak <= BUDGET else 'over'}")
        out.append(f"| {mode} | {a / 2**30:.2f} + {b:.2f} x | " + " | ".join(cells) + " |")
    return ("Extrapolated peak RSS (GiB) in bfloat16 from a linear fit of the measured rows, against a 24 GiB "
            "budget (not measured):\n\n" + "\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="default,135m,0.5b")
    ap.add_argument("--dtype", default="float32", help="working dtype of the random models and both prune modes")
    ap.add_argument("--modes", default="memory,stream,export")
    ap.add_argument("--work", default=None, help="where the random checkpoints go (default: a temp directory)")
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args()
    from edgeprune.streaming import source_dir

    previous = json.loads((RESULTS / "scale.json").read_text())["rows"] if (RESULTS / "scale.json").is_file() else []
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        rows.append({"size": "-", "mode": "baseline", "dtype": "-", "params": 0, "model_bytes": 0,
                     **run("baseline", Path(tmp), Path(tmp), "float32", 600)})
        for size in [s for s in args.sizes.split(",") if s]:
            src = source_dir("default") if size == "default" else make_random(size, Path(args.work or tmp) / size,
                                                                               args.dtype)
            info = params_of(src)
            width = 2 if args.dtype != "float32" else 4
            base = {"size": size, "dtype": "float32" if size == "default" else args.dtype, **info,
                    "model_bytes": info["params"] * width,
                    "stream_target": (info["rest_params"] + 3 * info["layer_params"]) * width}
            pruned = Path(tmp) / f"{size}-pruned"
            for mode in args.modes.split(","):
                target = {"memory": pruned, "stream": Path(tmp) / f"{size}-streamed",
                          "export": Path(tmp) / f"{size}-onnx"}[mode]
                if mode == "export" and not pruned.is_dir():
                    continue
                res = run(mode, pruned if mode == "export" else src, target, base["dtype"], args.timeout)
                rows.append({**base, "mode": mode, "load_average": os.getloadavg(), **res})
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
                publish(previous, rows)
            if size != "default":
                import shutil

                shutil.rmtree(Path(args.work or tmp) / size, ignore_errors=True)
    print(publish(previous, rows))


def publish(previous: list[dict], rows: list[dict]) -> str:
    """Merge the new rows into bench/results/scale.json (replacing rows of the same size, mode and dtype) and
    rewrite the table and the plot; called after every measurement, so an interrupted run keeps its rows."""
    new = {(x["size"], x["mode"], x["dtype"]) for x in rows}
    rows = [r for r in previous if (r["size"], r["mode"], r["dtype"]) not in new] + rows
    save("scale", {"rows": rows, "recipe": "piem+lsps(bi), ratio 0.2, 1 round, 8x128 builtin calibration"})
    text = table(rows) + f"\n\nload average at the end: {os.getloadavg()[0]:.1f} (2 cores, shared)\n\n"
    text += extrapolate(rows)
    (RESULTS / "scale.md").write_text(text)
    plot(rows, RESULTS / "scale.png")
    return text

if __name__ == "__main__":
    main()
