"""The one typed configuration of pruning and model loading.

``PruneConfig`` is what `edgeprune prune` takes as options, what the ``[prune]`` section of an `edgeprune run`
config holds, and what the Python API (``edgeprune.prune.prune_model``) reads: the same fields, the same
defaults, one validation. ``ModelLoad`` (device, dtype) is what `score`, `prune`, `eval` and `run` load models
with; ``DataSpec`` names the calibration and evaluation text. The CLI options are generated from these fields
(edgeprune/cli_options.py), so a field cannot be added to one without the other.

The defaults are the best recipe measured in BENCHMARKS.md (ablation, without retraining): PIEM scores, LSPS
allocation with Block Influence sensitivity, several rounds, the least-squares refit, 64 calibration windows of
WikiText-2 *valid* when ``$EDGEPRUNE_DATA`` names a data directory that has it, else the built-in text. Distillation
(``recover_steps``) stays opt-in: it costs minutes.

Why dataclasses and not pydantic: the rules that matter are cross-field and registry checks (bounds, known
scorers and allocators), written by hand either way; type coercion from TOML and ``--set`` is the small
``coerce`` below, with the one-line errors this project wants (pydantic's are multi-line, one per field, with
links); callers construct ``PruneConfig(0.2, "piem", "lsps")`` positionally, which pydantic models do not allow;
and the standard library keeps ``import edgeprune.cli`` free of another dependency. ``dataclasses.fields`` gives
the CLI generator and the TOML loader everything they need (type, default, help in the field's metadata).

Not here: loading text or models, and the pipeline's other sections (edgeprune/pipeline/config.py).
"""

from __future__ import annotations

import os
import re
import types
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.errors import EdgePruneError
from edgeprune.models.placement import DTYPES


def option(default: Any, help: str, *, flag: str | None = None, cli: bool = True) -> Any:
    """A config field with its CLI help; ``flag``: the CLI name when it is not ``--field-name``; ``cli=False``:
    Python API only."""
    meta = {"help": help, "flag": flag, "cli": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


# --------------------------------------------------------------------------------------------- coercion


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` (from TOML, ``--set`` or the CLI) as type ``tp``, or a one-line error naming ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # str | list[str] (one spec or candidates), X | None
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        lists = [a for a in kinds if typing.get_origin(a) is list]
        scalars = [a for a in kinds if typing.get_origin(a) is not list]
        return coerce(lists[0] if isinstance(value, list) or not scalars else scalars[0], value, where)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise EdgePruneError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EdgePruneError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if not _is_number(value):
            raise EdgePruneError(f"{where} must be a number, got {value!r}")
        return float(value)
    if origin is list:
        if isinstance(value, str):  # a comma-separated CLI value
            value = [_scalar(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise EdgePruneError(f"{where} must be a list, got {value!r}")
        return [coerce(args[0], v, where) for v in value] if args else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise EdgePruneError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if _is_number(value):
        return str(value)
    if not isinstance(value, str):
        raise EdgePruneError(f"{where} must be a string, got {value!r}")
    return value


def _scalar(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# --------------------------------------------------------------------------------------------- sections


DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|auto)$")


@dataclass
class ModelLoad:
    """Where and in which dtype models are loaded (`score`, `prune`, `eval`, `run`)."""

    device: str = option("cpu", "torch device to load the model on: cpu | cuda | cuda:N | auto")
    dtype: str = option("float32", "weights dtype: float32 | bfloat16 | float16")

    def validate(self) -> None:
        if not DEVICE.match(self.device):
            raise EdgePruneError(f"unknown device '{self.device}'; choose cpu, cuda, cuda:N or auto")
        if self.dtype not in DTYPES:
            raise EdgePruneError(f"unknown dtype '{self.dtype}'; choose from {', '.join(DTYPES)}")

    @property
    def is_default(self) -> bool:
        return (self.device, self.dtype) == ("cpu", "float32")


STREAM_GRADIENTS = ("lens", "none")  # the first is the default, measured: bench/stream_gradient.py, README "Scale"
AUTO = "auto"  # WikiText-2 valid from the data directory when it is there, else the built-in text


def data_dir() -> Path | None:
    """The evaluation-data directory ``$EDGEPRUNE_DATA`` (the Makefile sets it to ``DATA``), or None."""
    value = os.environ.get("EDGEPRUNE_DATA", "")
    return Path(value).expanduser() if value else None


def text_candidates(spec: str | list[str], split: str) -> list[str]:
    """A text spec, or a list of them (the first that exists wins); ``auto`` expands to WikiText-2 (valid for
    calibration, the raw test file for evaluation) under ``data_dir()``, then ``builtin``."""
    specs = spec if isinstance(spec, list) else [spec]
    out = []
    for s in specs:
        if s == AUTO:
            root = data_dir()
            if root is not None:
                wt = root / "wikitext-2"
                out.append(str(wt / "tokens" / "valid.txt") if split == "calib" else str(wt / "wiki.test.raw"))
            out.append("builtin")
        else:
            out.append(s)
    return out


@dataclass
class DataSpec:
    """Calibration and evaluation text: a spec (``auto``, ``builtin``, a file, a directory, ``wikitext2``/
    ``ptb``/``c4``) or a list of them, the first that exists."""

    calib: str | list[str] = option(AUTO, "calibration text: 'auto' (WikiText-2 valid under $EDGEPRUNE_DATA, "
                                    "else builtin), 'builtin', a file/dir, or wikitext2|ptb|c4",
                                    flag="--calib")
    eval: str | list[str] = option("builtin", "evaluation text: 'builtin', a file/dir, 'auto', or "
                                   "wikitext2|ptb|c4", flag="--data")


def check_streamable(cfg, device: str = "cpu") -> None:
    """One-line errors, each naming the option to change, for what a streamed prune cannot do (``cfg`` a
    PruneConfig, ``device`` the torch device models load on; PruneConfig.validate calls this when ``stream`` is
    set)."""
    if device != "cpu":
        raise EdgePruneError(f"--stream runs on the CPU: use --device cpu (run.device), not '{device}'")
    if cfg.allocator == "lsps" and cfg.sensitivity != "bi":
        raise EdgePruneError(f"--stream supports the bi sensitivity only: use --sensitivity bi (prune.sensitivity), "
                             f"'{cfg.sensitivity}' needs whole-model passes")
    if cfg.recover_steps:
        raise EdgePruneError("--stream cannot distill: use --recover-steps 0 (prune.recover_steps); distillation "
                             "needs the model resident")
    if cfg.stream_gradient == "none" and cfg.scorer == "taylor":
        raise EdgePruneError("the taylor scorer is all gradient: stream it with --stream-gradient lens "
                             "(prune.stream_gradient)")


@dataclass
class PruneConfig:
    """Everything `edgeprune prune` decides; the defaults are the best measured recipe (module docstring)."""

    ratio: float = option(0.2, "fraction of decoder-layer parameters to remove, in [0, 1)")
    scorer: str = option("piem", "magnitude | taylor | wanda-sp | fluctuation | random | piem")
    allocator: str = option("lsps", "how much to remove per layer: uniform | lsps | global | owl | depth")
    attn_unit: str = option("group", "attention unit: 'group' (KV head + its query heads) or 'head' (query "
                            "heads, same count from every group)")
    round_to: int = option(1, "round kept MLP widths to a multiple of this")
    rounds: int = option(3, "prune in K steps, re-scoring and re-measuring sensitivity after each (1 = one-shot)")
    n_samples: int = option(64, "calibration windows")
    seq_len: int = option(128, "tokens per calibration window", flag="--calib-seq-len")
    seed: int = option(0, "seed for calibration sampling and the random scorer")
    scorer_options: dict = option({}, "extra scorer keyword arguments (Python API)", cli=False)
    sensitivity: str = option("bi", "LSPS layer sensitivity: loss | bi | fisher")
    probe_ratio: float = option(0.3, "share of a module's units the loss/fisher probe removes")
    tau: float = option(1.0, "LSPS: how strongly ratios follow sensitivity (0 = uniform)")
    min_module_ratio: float = option(0.0, "LSPS: lower bound of a module's ratio")
    max_module_ratio: float = option(0.8, "LSPS: upper bound of a module's ratio")
    bias_compensation: bool = option(False, "add removed units' mean output to the bias (FLAP)")
    reconstruct: bool = option(True, "refit each pruned block's output projection by least squares on the "
                               "calibration text (includes the bias)")
    damp: float = option(1e-3, "refit: ridge damping relative to the mean diagonal of the Gram matrix")
    sensitivity_samples: int = option(16, "calibration windows for the loss probe (a subset of the calibration "
                                      "set)")
    recover_steps: int = option(0, "recovery: distillation steps from the unpruned model on calibration text "
                                "after pruning (0 = off)")
    recover_lr: float = option(2e-3, "recovery: peak learning rate relative to each weight's RMS")
    recover_batch: int = option(4, "recovery: windows per step")
    recover_ce: float = option(0.0, "recovery: share of next-token cross-entropy in the loss (0 = pure "
                               "distillation)")
    recover_autocast: str = option("auto", "recovery: bfloat16 autocast of the teacher pass and the training steps: "
                                   "auto (where the CPU/GPU computes bf16 natively) | on | off")
    recover_freeze: int = option(0, "recovery: the first N decoder layers stay frozen, so the backward pass stops "
                                 "above them (faster steps)")
    piem_weights: list[float] = option([], "PIEM term weights 'alpha,beta,gamma' (weight, gradient, context); "
                                       "empty: PIEM's defaults")
    stream: bool = option(False, "prune a model larger than memory layer by layer from its safetensors files "
                          "(one decoder layer resident at a time; README 'Scale')")
    stream_gradient: str = option(STREAM_GRADIENTS[0], "streamed PIEM/Taylor gradient term: lens (each layer's "
                                  "logit-lens loss) | none")
    # LSPS latency budget (edgeprune fit): per layer [cost of one KV group, of one MLP channel], e.g. decode ms;
    # the ratio is then the share of that cost removed. None: the parameter budget
    unit_cost: list | None = option(None, "LSPS cost per unit (Python API, edgeprune fit)", cli=False)

    def scorer_kwargs(self) -> dict:
        """``scorer_options`` plus the PIEM weights, if given."""
        if not self.piem_weights:
            return dict(self.scorer_options)
        if self.scorer != "piem":
            raise EdgePruneError("--piem-weights (prune.piem_weights) only applies to the piem scorer")
        if len(self.piem_weights) != 3:
            raise EdgePruneError("--piem-weights (prune.piem_weights) takes three numbers, e.g. 0.1,0.1,0.8")
        return {**self.scorer_options, **dict(zip(("alpha", "beta", "gamma"), self.piem_weights, strict=True))}

    def recovery(self):
        from edgeprune.recover import RecoveryConfig

        return RecoveryConfig(self.recover_steps, self.recover_lr, self.recover_batch, ce_weight=self.recover_ce,
                              seed=self.seed + 1, freeze_layers=self.recover_freeze,
                              autocast=self.recover_autocast)

    def validate(self) -> None:
        """One-line errors for every bad option, before any model time is spent."""
        from edgeprune.allocation import ALLOCATORS, check_ratio
        from edgeprune.allocation.base import ATTN_UNITS
        from edgeprune.scoring import make_scorer
        from edgeprune.sensitivity import SENSITIVITIES

        check_ratio(self.ratio)
        make_scorer(self.scorer, seed=self.seed, **self.scorer_kwargs())  # unknown scorers and options fail here
        for what, value, known in (("allocator", self.allocator, ALLOCATORS), ("attention unit", self.attn_unit,
                                   ATTN_UNITS), ("sensitivity", self.sensitivity, SENSITIVITIES)):
            if value not in known:
                raise EdgePruneError(f"unknown {what} '{value}'; choose from {', '.join(known)}")
        if self.rounds < 1 or self.round_to < 1 or self.n_samples < 1 or self.seq_len < 2:
            raise EdgePruneError("rounds, round-to and the number of calibration samples must be at least 1, "
                                 "the calibration sequence length at least 2")
        if not 0 < self.probe_ratio < 1:
            raise EdgePruneError("probe-ratio must be in (0, 1)")
        if not 0 <= self.min_module_ratio <= self.max_module_ratio < 1:
            raise EdgePruneError("need 0 <= min-module-ratio <= max-module-ratio < 1")
        if self.unit_cost is not None and (self.allocator != "lsps" or self.attn_unit != "group"):
            raise EdgePruneError("a latency budget (unit_cost) needs the lsps allocator with attention unit 'group'")
        self.recovery().validate()
        if self.stream_gradient not in STREAM_GRADIENTS:
            raise EdgePruneError(f"unknown stream-gradient '{self.stream_gradient}'; choose from "
                                 f"{', '.join(STREAM_GRADIENTS)}")
        if self.stream:
            check_streamable(self)

    def to_dict(self) -> dict:
        return asdict(self)


def recipe_notes(adapter, cfg: PruneConfig) -> list[str]:
    """What the measurements say about this recipe on this kind of model, for the user (one line each)."""
    post_norms = any(n.attention_output is not None or n.mlp_output is not None
                     for n in (layer.norms() for layer in adapter.layers))
    if post_norms and (cfg.reconstruct or cfg.allocator == "lsps"):
        return ["this model normalises each block's output before the residual add, as Gemma 3 does; on "
                "Gemma-3-270M --allocator uniform --no-reconstruct measured better than LSPS and the refit "
                "(README, Results)"]
    return []
