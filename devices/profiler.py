"""On-device profiler for an ONNX or GGUF artifact. Runs on the device: imports the standard library, numpy, psutil
and one runtime (onnxruntime + tokenizers for ONNX, llama-cpp-python for GGUF) — never torch or transformers.

Measures load time, prefill latency and time to first token at several prompt lengths, decode tokens/s and
per-token latency (p50/p95), peak resident memory and the artifact's size, with warm-up runs and medians over
repeats, and writes one JSON document that also records the machine, the runtime versions, the execution
provider and the sha256 of the artifact's manifest. Before loading anything it checks that the artifact plus
its runtime fit the memory budget, and refuses (exit code 2, one line on stderr) when they do not.

Three ways to run it, same code:

    edgeprune profile ARTIFACT_DIR --device cpu [--json PATH]       # host CLI (runs this in a subprocess)
    python -m edgeprune.devices.profiler ARTIFACT_DIR [options]
    python profiler.py ARTIFACT_DIR [options]                        # on a device: this file + its siblings
                                                                     # (ort_generate.py / llama_generate.py)

Device-side install: ``pip install numpy psutil llama-cpp-python`` (GGUF) and/or
``pip install numpy psutil onnxruntime tokenizers`` (ONNX; ``onnxruntime-gpu`` on Jetson).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = "edgeprune.profile/1"
MiB = 1 << 20
DEFAULT_PROMPT_LENGTHS = (32, 128, 512)
DEFAULT_NEW_TOKENS = 64
DEFAULT_DECODE_PROMPT = 128
# Memory model (see estimate_memory_for), calibrated on this repository's x86-64 CPU host with SmolLM2-135M dense
# and pruned (bench/fit_memory.py; README "fit"): the fixed cost of Python + numpy + psutil + the runtime; how
# many bytes of resident memory one byte of the model file costs (llama.cpp maps the file; onnxruntime holds
# the parsed model and its initializers, 1.27x the file); and onnxruntime's prepacked copy of MatMulNBits
# weights (every MatMul's, not the embedding's Gather), per byte of those weights, by dtype.
RUNTIME_OVERHEAD_MIB = {"onnx": 60.0, "gguf": 70.0}
WEIGHT_FACTOR = {"onnx": 1.27, "gguf": 1.0}
PREPACK_FACTOR = {"int8": 0.9}
ONNX_EMBEDDING_BYTES = {"int8": 1.125, "fp16": 2.0, "fp32": 4.0}  # per embedding weight (GatherBlockQuantized)
LOGITS_COPIES = {"onnx": 1.35, "gguf": 2.0}  # logits buffers held at once during prefill (runtime + numpy)
MARGIN = 1.10
TOKENIZER_NAMES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "config.json", "manifest.json", "vocab.json", "merges.txt"}


class ProfileError(Exception):
    """A user-facing problem (no artifact, budget exceeded, runtime missing): one line, exit code 2."""


def _sibling(name: str):
    """Import a sibling device module, whether this file runs inside edgeprune or alone in a bundle."""
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # run through runpy/exec rather than `python profiler.py`
        sys.path.insert(0, here)
    return importlib.import_module(name)


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


# ---- artifact -----------------------------------------------------------------------------------------------
def artifact_format(path: Path) -> tuple[str, Path]:
    """("onnx"|"gguf", model file) of an artifact directory (or a model file)."""
    path = Path(path)
    if path.is_file():
        if path.suffix in (".onnx", ".gguf"):
            return path.suffix[1:], path
        raise ProfileError(f"{path} is neither a .onnx nor a .gguf file")
    if not path.is_dir():
        raise ProfileError(f"artifact not found: {path}")
    found = [(fmt, path / f"model.{fmt}") for fmt in ("gguf", "onnx") if (path / f"model.{fmt}").is_file()]
    if not found:
        raise ProfileError(f"{path} is not an artifact directory (no model.gguf or model.onnx)")
    return found[0]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def artifact_info(path: Path) -> dict:
    fmt, model = artifact_format(path)
    root = model.parent
    files = [f for f in root.rglob("*") if f.is_file()] if Path(path).is_dir() else [model]
    weights = [f for f in files if f.name not in TOKENIZER_NAMES and f.suffix not in (".txt", ".md")]
    manifest_path = root / "manifest.json"
    manifest = _read_json(manifest_path)
    info = {"path": str(Path(path)), "name": root.name if Path(path).is_dir() else model.stem, "format": fmt,
            "model_file": model.name, "size_bytes": sum(f.stat().st_size for f in files),
            "model_bytes": sum(f.stat().st_size for f in weights),
            "dtype": manifest.get("dtype"), "manifest_kind": manifest.get("kind"),
            "manifest_created": manifest.get("created"), "source": manifest.get("source"),
            "manifest_sha256": None}
    if manifest_path.is_file():
        info["manifest_sha256"] = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    bundle = _read_json(root.parent / "bundle.json")
    if bundle.get("id"):  # shipped: the directory is called "artifact"; keep the artifact's own name
        info["bundle_id"] = bundle["id"]
        info["name"] = bundle.get("artifact") or info["name"]
    return info


def model_shape(path: Path) -> dict:
    """Layers' KV heads, head size, hidden size, query heads, vocabulary and trained context of an artifact, from
    the GGUF header (GGUF) or manifest.json / config.json (ONNX). Missing values are None."""
    fmt, model = artifact_format(path)
    root = model.parent
    cfg = _read_json(root / "config.json")
    man = _read_json(root / "manifest.json")
    shape = {"kv_heads": None, "head_dim": None, "hidden": None, "heads": None, "vocab": None, "context": None}
    if fmt == "gguf":
        meta = _sibling("llama_generate").gguf_metadata(model)
        arch = meta.get("general.architecture", "llama")
        n_layers = int(meta.get(f"{arch}.block_count", 0))
        kv = meta.get(f"{arch}.attention.head_count_kv")
        heads = meta.get(f"{arch}.attention.head_count")
        shape["kv_heads"] = [int(k) for k in kv] if isinstance(kv, list) else [int(kv or 0)] * n_layers
        shape["heads"] = max(heads) if isinstance(heads, list) else heads
        shape["hidden"] = meta.get(f"{arch}.embedding_length")
        shape["head_dim"] = meta.get(f"{arch}.attention.key_length") or (
            shape["hidden"] // shape["heads"] if shape["hidden"] and shape["heads"] else None)
        shape["context"] = meta.get(f"{arch}.context_length")
        tokens = meta.get("tokenizer.ggml.tokens")
        shape["vocab"] = tokens.get("array_len") if isinstance(tokens, dict) else (len(tokens) if tokens else None)
    else:
        n_layers = int(cfg.get("num_hidden_layers") or man.get("num_layers") or 0)
        kv = man.get("kv_heads") or cfg.get("layer_num_kv_heads")
        shape["kv_heads"] = [int(k) for k in kv] if kv else [int(cfg.get("num_key_value_heads") or 0)] * n_layers
        shape["heads"] = cfg.get("num_attention_heads")
        shape["hidden"] = cfg.get("hidden_size")
        shape["head_dim"] = man.get("head_dim") or cfg.get("head_dim") or (
            shape["hidden"] // shape["heads"] if shape["hidden"] and shape["heads"] else None)
        shape["context"] = cfg.get("max_position_embeddings")
        shape["vocab"] = man.get("vocab_size") or cfg.get("vocab_size")
    return shape


def estimate_memory(path: Path, n_ctx: int, max_prompt: int, info: dict | None = None) -> dict:
    """Resident memory the profiler will need for the artifact at ``path`` (see ``estimate_memory_for``)."""
    info = info or artifact_info(path)
    return estimate_memory_for(info["format"], info["model_bytes"], model_shape(path), n_ctx, max_prompt,
                               info.get("dtype"))


def estimate_memory_for(fmt: str, model_bytes: float, shape: dict, n_ctx: int, max_prompt: int,
                        dtype: str | None = None) -> dict:
    """Resident memory, in MiB, of an artifact described by its format, its model file's size in bytes, its
    shape (``model_shape``'s keys) and dtype, by part: ``expected_mb`` is the predicted peak RSS, ``estimate_mb``
    (what the budget check compares) adds a 10 % margin. The parts: the weights (x WEIGHT_FACTOR, plus
    onnxruntime's prepacked MatMulNBits copy), the KV cache at ``n_ctx`` tokens (f16 in llama.cpp, which pads
    every layer's V cache to the widest layer's when they differ; f32 in onnxruntime), prefill activations
    (onnxruntime returns logits for every prompt position) and the runtime. Needs no file, so a host can predict
    an artifact's check before the artifact exists (edgeprune fit)."""
    kv = [int(k) for k in shape.get("kv_heads") or []]
    head_dim = int(shape.get("head_dim") or 0)
    vocab, hidden, heads = (int(shape.get(k) or 0) for k in ("vocab", "hidden", "heads"))
    if fmt == "gguf":
        v_heads = max(kv, default=0) * sum(1 for k in kv if k) if len(set(k for k in kv if k)) > 1 else sum(kv)
        kv_bytes = (sum(kv) + v_heads) * head_dim * n_ctx * 2
    else:
        kv_bytes = 2 * sum(kv) * head_dim * n_ctx * 4
    rows = max_prompt if fmt == "onnx" else 1  # logits rows the runtime materialises
    act_bytes = rows * vocab * 4 * LOGITS_COPIES[fmt] + max_prompt * (hidden * 4 * 8 + heads * max_prompt * 4)
    weights = model_bytes * WEIGHT_FACTOR[fmt]
    if fmt == "onnx" and dtype in PREPACK_FACTOR:
        matmul_bytes = max(model_bytes - vocab * hidden * ONNX_EMBEDDING_BYTES[dtype], 0)
        weights += matmul_bytes * PREPACK_FACTOR[dtype]
    parts = {"weights": weights / MiB, "kv_cache": kv_bytes / MiB, "activations": act_bytes / MiB,
             "runtime": RUNTIME_OVERHEAD_MIB[fmt]}
    expected = sum(parts.values())
    return {"estimate_mb": round(expected * MARGIN, 1), "expected_mb": round(expected, 1),
            "parts_mb": {k: round(v, 1) for k, v in parts.items()}, "margin": MARGIN, "n_ctx": n_ctx,
            "max_prompt_tokens": max_prompt}


def resolve_budget(budget) -> float | None:
    """A budget in MiB from a number, "auto" (80 % of this machine's RAM) or None (no check)."""
    if budget is None or budget == "":
        return None
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        import psutil

        return 0.8 * psutil.virtual_memory().total / MiB
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ProfileError(f"memory budget must be a number of MiB or 'auto', not {budget!r}") from None
    if value <= 0:
        raise ProfileError("memory budget must be positive")
    return value


def check_memory(estimate: dict, budget_mb: float | None, device: str | None = None) -> dict:
    result = {**estimate, "budget_mb": None if budget_mb is None else round(budget_mb, 1)}
    if budget_mb is None:
        result["fits"] = None
        return result
    result["fits"] = estimate["estimate_mb"] <= budget_mb
    if not result["fits"]:
        p = estimate["parts_mb"]
        where = f"device '{device}'" if device else "this device"
        raise ProfileError(
            f"artifact does not fit: it needs about {estimate['estimate_mb']:.0f} MiB (weights {p['weights']:.0f} + "
            f"KV cache {p['kv_cache']:.0f} + activations {p['activations']:.0f} + runtime {p['runtime']:.0f}, "
            f"+{100 * (MARGIN - 1):.0f}%) but {where} has a memory budget of {budget_mb:.0f} MiB; use a smaller "
            f"dtype or a more pruned model, fewer tokens (--prompt-lengths/--new-tokens), or raise the budget "
            f"(memory_budget_mb in the device profile, --memory-budget)")
    return result


# ---- machine ------------------------------------------------------------------------------------------------
def _first_line_of(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\0", b"").decode(errors="replace").strip().splitlines()[0] or None
    except (OSError, IndexError):
        return None


def _cpu_model() -> str | None:
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if fields.get(key):
            return fields[key]
    if fields.get("CPU part"):  # ARM without a model name: implementer/part ids (0xd0b = Cortex-A76)
        return f"ARM implementer {fields.get('CPU implementer')} part {fields['CPU part']}"
    return platform.processor() or None


def _os_release() -> str | None:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def machine_info() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    freq = None
    try:
        f = psutil.cpu_freq()
        freq = round(f.max or f.current) if f else None
    except (OSError, NotImplementedError, AttributeError):
        pass
    emulation = _sibling("emulation").detect()
    return {"cpu_model": _cpu_model(), "board": _first_line_of("/proc/device-tree/model"),
            "arch": platform.machine(), "emulated": emulation["emulated"], "emulation": emulation,
            "physical_cores": psutil.cpu_count(logical=False),
            "logical_cores": psutil.cpu_count(logical=True), "cpu_max_mhz": freq,
            "memory_total_mb": round(vm.total / MiB), "memory_available_mb": round(vm.available / MiB),
            "os": platform.platform(), "os_release": _os_release(), "python": platform.python_version(),
            "jetson_release": _first_line_of("/etc/nv_tegra_release"),
            "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


_DISTRIBUTIONS = {"llama_cpp": ("llama-cpp-python",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


def _versions(names) -> dict:
    """Versions of the modules that are installed, without importing the ones not loaded yet."""
    from importlib import metadata

    out = {}
    for name in names:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__version__", None):
            out[name] = mod.__version__
            continue
        for dist in _DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


# ---- memory -------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MiB


def peak_rss_mb() -> tuple[float | None, str]:
    """The process's resident high-water mark: VmHWM (Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "VmHWM"
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak / MiB if sys.platform == "darwin" else peak / 1024), "ru_maxrss"
    except (ImportError, OSError):
        return None, "unavailable"


# ---- runtimes -----------------------------------------------------------------------------------------------
class _OrtBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None, providers: list[str] | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ProfileError("ONNX artifacts need onnxruntime: pip install onnxruntime numpy psutil tokenizers "
                               "(onnxruntime-gpu on Jetson)") from None
        import numpy as np

        self.np = np
        available = ort.get_available_providers()
        requested = list(providers or ["CPUExecutionProvider"])
        use = [p for p in requested if p in available]
        if "CPUExecutionProvider" not in use:
            use.append("CPUExecutionProvider")
        self.providers_requested, self.providers_available = requested, available
        self.gen = _sibling("ort_generate").OrtGenerator(path, providers=use, threads=threads)
        self.providers_used = self.gen.session.get_providers()
        self.execution_provider = self.providers_used[0]
        self.threads = threads
        self._logits = None
        self._past = None
        self.vocab = None

    def prefill(self, ids) -> None:
        self._logits, self._past = self.gen.forward(self.np.array([ids], dtype=self.np.int64))

    def first_token(self) -> int:
        return int(self._logits[0, -1].argmax())

    def step(self, token: int) -> int:
        self._logits, self._past = self.gen.forward(self.np.array([[token]], dtype=self.np.int64), past=self._past)
        return int(self._logits[0, -1].argmax())

    def describe(self) -> dict:
        return {"name": self.name, "version": _versions(["onnxruntime"]).get("onnxruntime"),
                "execution_provider": self.execution_provider, "providers_requested": self.providers_requested,
                "providers_used": self.providers_used, "providers_available": self.providers_available,
                "threads": self.threads or "onnxruntime default"}

    def close(self) -> None:
        self.gen = None


class _LlamaBackend:
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int | None, n_gpu_layers: int, n_ctx: int, n_batch: int):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ProfileError("GGUF artifacts need llama-cpp-python: pip install llama-cpp-python numpy psutil "
                               "(built with CUDA on Jetson: CMAKE_ARGS=-DGGML_CUDA=on)") from None
        try:
            self.gen = _sibling("llama_generate").LlamaGenerator(path, n_ctx=n_ctx, threads=threads,
                                                                 n_gpu_layers=n_gpu_layers, n_batch=n_batch)
        except (ValueError, RuntimeError) as e:
            raise ProfileError(f"llama.cpp cannot load {path}: {str(e).strip().splitlines()[0][:200]}") from None
        self.threads = self.gen.llm.context_params.n_threads
        self.threads_batch = self.gen.llm.context_params.n_threads_batch
        self.execution_provider = self.gen.execution_provider
        self.n_gpu_layers = n_gpu_layers
        self.n_ctx, self.n_batch = self.gen.n_ctx, n_batch

    def prefill(self, ids) -> None:
        self.gen.prefill_only(ids)

    def first_token(self) -> int:
        return self.gen._argmax()

    def step(self, token: int) -> int:
        return self.gen.step(token)

    def describe(self) -> dict:
        import llama_cpp

        info = llama_cpp.llama_print_system_info()
        return {"name": self.name, "version": getattr(llama_cpp, "__version__", None),
                "execution_provider": self.execution_provider, "n_gpu_layers": self.n_gpu_layers,
                "gpu_offload_supported": self.gen.gpu_offload, "threads": self.threads,
                "threads_batch": self.threads_batch, "n_ctx": self.n_ctx, "n_batch": self.n_batch,
                "extra_buffer_types": self.gen.extra_buffer_types, "file_type": self.gen.file_type,
                "system_info": info.decode(errors="replace").strip() if isinstance(info, bytes) else str(info)}

    def close(self) -> None:
        self.gen.close()


# ---- measurement --------------------------------------------------------------------------------------------
def _median(xs):
    return statistics.median(xs) if xs else None


def _percentile(xs, q: float):
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(x):
    return None if x is None else round(1000 * x, 3)


def _ids(rng, n: int, vocab: int) -> list[int]:
    low = min(3, max(vocab - 1, 0))  # skip the usual special ids; any id is valid for timing
    return [int(t) for t in rng.integers(low, max(vocab, low + 1), n)]


def measure_prefill(backend, lengths, vocab: int, warmup: int, repeats: int, rng) -> list[dict]:
    rows = []
    for n in lengths:
        ids = _ids(rng, n, vocab)
        for _ in range(warmup):
            backend.prefill(ids)
            backend.first_token()
        pre, ttft = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.prefill(ids)
            t1 = time.perf_counter()
            backend.first_token()
            t2 = time.perf_counter()
            pre.append(t1 - t0)
            ttft.append(t2 - t0)
        p = _median(pre)
        rows.append({"prompt_tokens": n, "prefill_ms": _ms(p), "prefill_tokens_per_s": round(n / p, 2) if p else None,
                     "ttft_ms": _ms(_median(ttft)), "prefill_ms_all": [_ms(x) for x in pre],
                     "ttft_ms_all": [_ms(x) for x in ttft]})
    return rows


def measure_decode(backend, prompt_tokens: int, new_tokens: int, vocab: int, warmup: int, repeats: int,
                   rng) -> dict:
    ids = _ids(rng, prompt_tokens, vocab)

    def run(steps: int) -> list[float]:
        backend.prefill(ids)
        tok = backend.first_token()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tok = backend.step(tok)
            times.append(time.perf_counter() - t0)
        return times

    for _ in range(warmup):
        run(min(new_tokens, 8))
    per_run, all_steps = [], []
    for _ in range(repeats):
        times = run(new_tokens)
        all_steps += times
        per_run.append(len(times) / sum(times) if sum(times) else None)
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "tokens_per_s": round(_median([x for x in per_run if x]), 2) if any(per_run) else None,
            "tokens_per_s_all": [round(x, 2) if x else None for x in per_run],
            "ms_per_token_p50": _ms(_percentile(all_steps, 0.5)), "ms_per_token_p95": _ms(_percentile(all_steps, 0.95)),
            "ms_per_token_mean": _ms(statistics.fmean(all_steps)) if all_steps else None,
            "steps_measured": len(all_steps)}


def resolve_threads(x) -> int | None:
    """None/"" (the runtime's default), "auto" (the physical cores) or a positive integer."""
    if x in (None, "", 0, "0"):
        return None
    if str(x).lower() == "auto":
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        n = int(x)
    except (TypeError, ValueError):
        raise ProfileError(f"threads must be a positive integer or 'auto', not {x!r}") from None
    if n < 1:
        raise ProfileError("threads must be at least 1")
    return n


def plan_context(prompt_lengths, new_tokens: int, decode_prompt: int | None, limit: int | None):
    """(prompt lengths that fit the model's context, the ones that do not, decode prompt length, n_ctx)."""
    lengths = sorted({int(n) for n in prompt_lengths})
    if not lengths or lengths[0] < 1:
        raise ProfileError("prompt lengths must be positive integers")
    skipped = []
    if limit:
        skipped = [n for n in lengths if n > limit]
        lengths = [n for n in lengths if n <= limit]
        if not lengths:
            raise ProfileError(f"every prompt length exceeds the model's context of {limit} tokens")
    decode_prompt = int(decode_prompt or min(DEFAULT_DECODE_PROMPT, lengths[-1]))
    if limit and decode_prompt + new_tokens > limit:
        decode_prompt = max(1, limit - new_tokens)
        if decode_prompt + new_tokens > limit:
            raise ProfileError(f"--new-tokens {new_tokens} does not fit the model's context of {limit} tokens")
    n_ctx = max(lengths[-1], decode_prompt + new_tokens)
    n_ctx = -(-n_ctx // 256) * 256
    if limit:
        n_ctx = min(n_ctx, limit)
    return lengths, skipped, decode_prompt, n_ctx


def memory_check_for(artifact, prompt_lengths, new_tokens: int, decode_prompt: int | None, budget,
                     device: str | None = None) -> dict:
    """The check ``profile`` does before loading anything (raises ProfileError when the artifact does not fit)."""
    path = Path(artifact)
    shape = model_shape(path)
    limit = int(shape["context"]) if shape.get("context") else None
    lengths, _, _, n_ctx = plan_context(prompt_lengths, new_tokens, decode_prompt, limit)
    return check_memory(estimate_memory(path, n_ctx, lengths[-1]), resolve_budget(budget), device)


def profile(artifact, *, device: str | None = None, threads=None, providers=None, n_gpu_layers: int = 0,
            prompt_lengths=DEFAULT_PROMPT_LENGTHS, new_tokens: int = DEFAULT_NEW_TOKENS,
            decode_prompt: int | None = None, warmup: int = 1, repeats: int = 5, memory_budget_mb=None,
            seed: int = 0, quiet: bool = False) -> dict:
    """Profile one artifact; returns the JSON document (schema ``edgeprune.profile/1``, see the README)."""
    import numpy as np

    start = time.perf_counter()
    path = Path(artifact)
    info = artifact_info(path)
    fmt = info["format"]
    if repeats < 1 or warmup < 0 or new_tokens < 1:
        raise ProfileError("--repeats and --new-tokens must be at least 1, --warmup at least 0")
    shape = model_shape(path)
    limit = int(shape["context"]) if shape.get("context") else None
    lengths, skipped, decode_prompt, n_ctx = plan_context(prompt_lengths, new_tokens, decode_prompt, limit)
    budget = resolve_budget(memory_budget_mb)
    memory_check = check_memory(estimate_memory(path, n_ctx, lengths[-1], info), budget, device)
    threads = resolve_threads(threads)
    machine = machine_info()
    rss_before = rss_mb()
    _log(quiet, f"profiling {info['name']} ({fmt} {info['dtype'] or ''}, {info['size_bytes'] / MiB:.1f} MiB): "
                f"prompts {lengths}, {new_tokens} new tokens, {warmup} warm-up + {repeats} repeats")
    t0 = time.perf_counter()
    if fmt == "onnx":
        backend = _OrtBackend(path, threads, list(providers) if providers else None)
    else:
        backend = _LlamaBackend(path, threads, int(n_gpu_layers or 0), n_ctx, min(512, n_ctx))
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    vocab = int(shape["vocab"] or 0) or (backend.gen.n_vocab if fmt == "gguf" else 0)
    if not vocab:
        backend.prefill([0])
        vocab = int(backend._logits.shape[-1])
    rng = np.random.default_rng(seed)
    _log(quiet, f"loaded in {load_s:.2f} s with {backend.execution_provider}; measuring prefill")
    prefill = measure_prefill(backend, lengths, vocab, warmup, repeats, rng)
    for row in prefill:
        _log(quiet, f"  prompt {row['prompt_tokens']:>5}: prefill {row['prefill_ms']:.1f} ms, "
                    f"TTFT {row['ttft_ms']:.1f} ms")
    decode = measure_decode(backend, decode_prompt, new_tokens, vocab, warmup, repeats, rng)
    _log(quiet, f"  decode: {decode['tokens_per_s']} tokens/s, p50 {decode['ms_per_token_p50']} ms, "
                f"p95 {decode['ms_per_token_p95']} ms")
    peak, source = peak_rss_mb()
    if hasattr(os, "getloadavg"):
        machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    warnings = []
    loads = [max(machine.get("load_avg") or [0]), max(machine.get("load_avg_end") or [0])]
    cores = machine.get("logical_cores") or 1
    if max(loads) > 0.75 * cores:
        warnings.append(f"the machine was busy (load average up to {max(loads):.1f} on {cores} cores): the "
                        f"timings include contention with other processes")
    if machine["emulated"]:
        warnings.append(f"EMULATED: measured under {machine['emulation']['emulator']}; these timings are not "
                        f"{machine['arch']} device timings (only functional results carry over)")
    if skipped:
        warnings.append(f"prompt lengths {skipped} exceed the model's context of {limit} tokens and were skipped")
    runtime = backend.describe()
    runtime["versions"] = _versions(["numpy", "psutil", "tokenizers", "onnxruntime", "llama_cpp"])
    backend.close()
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device,
        "arch": machine["arch"],
        "emulated": machine["emulated"],  # True: timings from an emulator, not from the device
        "artifact": info,
        "machine": machine,
        "runtime": runtime,
        "settings": {"prompt_lengths": lengths, "skipped_prompt_lengths": skipped, "new_tokens": new_tokens,
                     "decode_prompt_tokens": decode_prompt, "warmup": warmup, "repeats": repeats, "seed": seed,
                     "n_ctx": n_ctx, "model_context": limit},
        "memory_check": memory_check,
        "load_s": round(load_s, 4),
        "prefill": prefill,
        "decode": decode,
        "memory": {"rss_before_load_mb": round(rss_before, 1), "rss_after_load_mb": round(rss_loaded, 1),
                   "peak_rss_mb": None if peak is None else round(peak, 1), "peak_rss_source": source,
                   "rss_end_mb": round(rss_mb(), 1)},
        "warnings": warnings,
        "seconds": round(time.perf_counter() - start, 2),
    }


def write_json(path, data: dict) -> None:
    """Atomic write (temp file + rename), so a reader never sees half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="profiler.py", description="Profile an ONNX or GGUF artifact on this device "
                                 "(load, prefill, TTFT, decode tokens/s, latency percentiles, peak RSS).")
    ap.add_argument("artifact", help="artifact directory (model.onnx or model.gguf + tokenizer + manifest.json)")
    ap.add_argument("--device", help="device profile name, recorded in the output")
    ap.add_argument("--threads", help="runtime threads (default: the runtime's choice)")
    ap.add_argument("--providers", help="onnxruntime execution providers, comma-separated, in order of preference")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="llama.cpp layers to offload to the GPU (-1: all)")
    ap.add_argument("--prompt-lengths", type=_int_list, default=list(DEFAULT_PROMPT_LENGTHS))
    ap.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="decode steps per repeat")
    ap.add_argument("--decode-prompt", type=int, help=f"prompt tokens before decoding (default {DEFAULT_DECODE_PROMPT})")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-budget", default=None, help="MiB or 'auto' (80%% of RAM); refuse when the artifact "
                    "would not fit (default: no check)")
    ap.add_argument("--check-only", action="store_true", help="only run the memory check, print it as JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", help="write the result here (default: print it on stdout)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check_only:
            result = memory_check_for(args.artifact, args.prompt_lengths, args.new_tokens, args.decode_prompt,
                                      args.memory_budget, args.device)
        else:
            providers = [p for p in (args.providers or "").split(",") if p] or None
            result = profile(args.artifact, device=args.device, threads=args.threads, providers=providers,
                             n_gpu_layers=args.n_gpu_layers, prompt_lengths=args.prompt_lengths,
                             new_tokens=args.new_tokens, decode_prompt=args.decode_prompt, warmup=args.warmup,
                             repeats=args.repeats, memory_budget_mb=args.memory_budget, seed=args.seed,
                             quiet=args.quiet)
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json_path:
        write_json(args.json_path, result)
        _log(args.quiet, f"wrote {args.json_path}")
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
