"""The search of ``edgeprune fit``: every (pruning ratio, dtype) of one format, each with its predicted memory
check, file size, decode speed, time to first token and quality; the choice is the configuration with the best
predicted quality among those predicted to meet every target.

Quality is predicted, not measured, in the search: PPL / dense PPL = exp(PRUNE_K * ratio) x DTYPE_PPL[dtype].
PRUNE_K is fitted to the full recipe's measured PPL on the default model (BENCHMARKS.md: 20 % -> 1.26x,
30 % -> 1.46x dense with distillation); DTYPE_PPL from the export table (q8_0 +1 %, q4_k_m +7 %). Only the order
of the configurations depends on it (a smaller ratio and a better dtype are better) unless ``--max-ppl-ratio``
is given; the measured PPL is reported beside it.

Does NOT prune, export or measure (``run.py`` does), and knows nothing of files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from edgeprune.errors import EdgePruneError
from edgeprune.fit.shapes import ModelShape, at_ratio

# 0 .. 0.70 in steps of 0.01: a coarser grid wastes quality (measured, bench/fit.py: at decode >= 1.3x the 0.05 grid
# chose 0.35, PPL 110.8, where 0.31 also met the target, PPL 104.4); a miss costs one more prune (the step)
RATIOS = tuple(round(0.01 * i, 2) for i in range(0, 71))
PRUNE_K = 1.2
DTYPE_PPL = {"f32": 1.0, "fp32": 1.0, "f16": 1.0, "fp16": 1.0, "int8": 1.005, "q8_0": 1.01, "q4_k_m": 1.07}
DEFAULT_DTYPES = {"gguf": ("q8_0", "q4_k_m"), "onnx": ("int8",)}
FORMAT_DTYPES = {"gguf": ("f32", "f16", "q8_0", "q4_k_m"), "onnx": ("fp32", "fp16", "int8")}


class Unreachable(EdgePruneError):
    """No configuration is predicted to meet the targets (one line: which target, and the best reachable value)."""


@dataclass
class Targets:
    max_memory_mb: float | None = None
    min_decode_tok_s: float | None = None
    max_ttft_ms: float | None = None
    prompt_tokens: int | None = None
    max_size_mb: float | None = None
    max_ppl_ratio: float | None = None
    budget_mb: float | None = None  # the device profile's memory budget: the profiler's check must pass

    def validate(self) -> None:
        for name in ("max_memory_mb", "min_decode_tok_s", "max_ttft_ms", "max_size_mb"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise EdgePruneError(f"--{name.replace('_', '-')} must be positive, not {v}")
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio >= 1:
            raise EdgePruneError(f"--max-ppl-ratio is PPL / dense PPL and must be at least 1, not {self.max_ppl_ratio}")
        if self.max_ttft_ms is not None and not self.prompt_tokens:
            raise EdgePruneError("--max-ttft-ms needs --prompt-tokens P (the prompt length it applies to)")
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise EdgePruneError("--prompt-tokens must be at least 1")

    def active(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "prompt_tokens"}


# how each target reads a prediction or a measurement: (key, sense, flag, unit); sense +1: at most, -1: at least
TARGETS = {"max_memory_mb": ("memory_mb", +1, "--max-memory-mb", "MiB"),
           "budget_mb": ("memory_check_mb", +1, "the device profile's memory budget", "MiB"),
           "min_decode_tok_s": ("decode_tok_s", -1, "--min-decode-tok-s", "tok/s"),
           "max_ttft_ms": ("ttft_ms", +1, "--max-ttft-ms", "ms"),
           "max_size_mb": ("size_mb", +1, "--max-size-mb", "MiB"),
           "max_ppl_ratio": ("ppl_ratio", +1, "--max-ppl-ratio", "x dense PPL")}


def predicted_ppl_ratio(ratio: float, dtype: str) -> float:
    return math.exp(PRUNE_K * ratio) * DTYPE_PPL.get(dtype, 1.0)


@dataclass
class Candidate:
    ratio: float
    fmt: str
    dtype: str
    predicted: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"ratio {self.ratio:.2f}, {self.fmt} {self.dtype}"

    def quality_key(self) -> tuple:
        """Smaller is better: predicted PPL ratio, then the faster of equals."""
        return (round(self.predicted["ppl_ratio"], 6), -self.predicted.get("decode_tok_s", 0.0))


def meets(value: float | None, limit: float, sense: int) -> bool:
    if value is None:
        return False
    return value <= limit if sense > 0 else value >= limit


def misses(values: dict, targets: Targets) -> list[str]:
    """The targets (by name) that ``values`` (a prediction or a measurement) does not meet."""
    out = []
    for name, limit in targets.active().items():
        key, sense, _, _ = TARGETS[name]
        if key in values and not meets(values[key], limit, sense):
            out.append(name)
    return out


def predict(base: ModelShape, ratio: float, fmt: str, dtype: str, models: dict, settings: dict,
            targets: Targets, round_to: int = 32, extra_bytes: int = 0, scale: dict | None = None,
            unit_cost=None) -> Candidate:
    """One configuration's predictions. ``models``: dtype -> LatencyModel (or None: speed not predicted);
    ``scale``: measured / predicted factors from earlier measurements ("decode", "ttft", "memory"; a
    "decode:DTYPE" key applies to that dtype only and wins over the plain one); ``unit_cost``:
    the ratio is a share of this per-unit cost (LSPS's latency budget) instead of parameters."""
    from edgeprune.fit.memory import predict_memory

    scale = scale or {}

    def factor(name: str) -> float:
        return scale.get(f"{name}:{dtype}", scale.get(name, 1.0))

    shape = at_ratio(base, ratio, round_to, unit_cost)
    mem = predict_memory(shape, fmt, dtype, settings)
    p = {"memory_mb": round(mem["expected_mb"] * factor("memory"), 1),
         "memory_check_mb": round(mem["estimate_mb"] * factor("memory"), 1),
         "size_mb": round(mem["size_bytes"] / 2**20 + extra_bytes / 2**20, 3),
         "ppl_ratio": round(predicted_ppl_ratio(ratio, dtype), 4),
         "params": shape.params()["total"]}
    model = models.get(dtype)
    if model is not None:
        p["decode_tok_s"] = round(model.decode_tok_s(shape) * factor("decode"), 2)
        if targets.prompt_tokens:
            p["ttft_ms"] = round(model.ttft_ms(shape, targets.prompt_tokens) * factor("ttft"), 1)
    return Candidate(ratio, fmt, dtype, p)


def candidates(base: ModelShape, fmt: str, dtypes, models: dict, settings: dict, targets: Targets,
               round_to: int = 32, ratios=RATIOS, extra_bytes: int = 0, scale: dict | None = None,
               unit_cost=None) -> list[Candidate]:
    return [predict(base, r, fmt, d, models, settings, targets, round_to, extra_bytes, scale, unit_cost)
            for d in dtypes for r in ratios]


def choose(cands: list[Candidate], targets: Targets, device: str = "", after: Candidate | None = None) -> Candidate:
    """The best predicted quality among the configurations predicted to meet every target (``after``: only
    configurations compressing more than that one). Raises ``Unreachable`` naming the target out of reach."""
    pool = [c for c in cands if after is None or (c.quality_key() > after.quality_key()
                                                  and (c.ratio, c.fmt, c.dtype) != (after.ratio, after.fmt, after.dtype))]
    ok = [c for c in pool if not misses(c.predicted, targets)]
    if ok:
        return min(ok, key=Candidate.quality_key)
    raise Unreachable(unreachable_message(pool or cands, targets, device))


def _best(cands: list[Candidate], key: str, sense: int) -> Candidate | None:
    have = [c for c in cands if c.predicted.get(key) is not None]
    if not have:
        return None
    return (min if sense > 0 else max)(have, key=lambda c: c.predicted[key])


def unreachable_message(cands: list[Candidate], targets: Targets, device: str = "") -> str:
    """One line: the target out of reach (alone if one is; else the one the others leave out of reach) and the best
    value any configuration reaches for it."""
    active = targets.active()
    where = f" on device '{device}'" if device else ""
    span = f"ratios up to {max(c.ratio for c in cands):.2f}, {', '.join(sorted({c.fmt + ' ' + c.dtype for c in cands}))}"
    order = sorted(active, key=lambda n: not _alone_unreachable(cands, n, active[n]))
    for name in order:
        key, sense, flag, unit = TARGETS[name]
        others = Targets(**{**asdict(targets), name: None})
        pool = [c for c in cands if not misses(c.predicted, others)]
        alone = _alone_unreachable(cands, name, active[name])
        if not alone and not pool:
            continue
        best = _best(cands if alone else pool, key, sense)
        if best is None:
            return f"{flag} {active[name]:g} cannot be predicted{where} (no latency model for {span})"
        word = {"decode_tok_s": "fastest", "ttft_ms": "quickest", "size_mb": "smallest", "memory_mb": "smallest",
                "memory_check_mb": "smallest", "ppl_ratio": "best"}[key]
        cond = "" if alone else " while meeting the other targets"
        what = {"memory_check_mb": "the profiler's memory check, with its margin", "memory_mb": "peak RSS",
                "size_mb": "artifact size",
                "decode_tok_s": "decode speed", "ttft_ms": f"TTFT at {targets.prompt_tokens} prompt tokens",
                "ppl_ratio": "predicted PPL / dense"}[key]
        return (f"{flag} {active[name]:g} is out of reach{where}{cond}: the {word} configuration ({best.label}) "
                f"is predicted at {best.predicted[key]:g} {unit} ({what}; searched {span})")
    return f"no configuration meets every target{where} ({span})"


def _alone_unreachable(cands: list[Candidate], name: str, limit: float) -> bool:
    key, sense, _, _ = TARGETS[name]
    return not any(meets(c.predicted.get(key), limit, sense) for c in cands)
