"""``edgeprune fit MODEL --device NAME``: predict, choose, then prove it on the device.

1. the device's latency model (measured once per device and runtime with synthetic shapes, then cached;
   only when a speed target is set or a table is cached already) and the profiler's memory check on predicted
   artifacts give every (ratio, dtype) of the format its predicted memory, size, decode speed, TTFT and quality;
2. the configuration with the best predicted quality that is predicted to meet every target is pruned with the
   product's full recipe (the ``[prune]`` section of ``edgeprune/configs/demo.toml``), exported, evaluated (PPL in
   the runtime, against the dense model's PyTorch PPL) and profiled on the device (here, or over SSH);
3. predicted and measured values are reported for every target; on a miss, the predictions are corrected by the
   measured/predicted factors and the next more compressed configuration is tried once.

Outputs (``--out``): ``r{RATIO}/model`` (pruned checkpoints), ``r{RATIO}-{FMT}-{DTYPE}/artifact``, their PPL and
profile JSON, and ``fit.json``. In `edgeprune run`, the ``[fit]`` section runs this as a stage (the recipe, texts and
PPL settings are then the run config's: ``FitOptions.prune``/``data``/``evaluate``; edgeprune/pipeline/fit_stages.py).
Does NOT know the run directory's layout, and does not draw the report (edgeprune/report_fit.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeprune.data import resolve_text
from edgeprune.errors import EdgePruneError
from edgeprune.fit import latency, search
from edgeprune.fit.measure import artifact_ppl, dense_ppl, export_to, measured_values, prune_to, tag
from edgeprune.fit.measure import log as _log
from edgeprune.fit.memory import profile_settings
from edgeprune.fit.shapes import ModelShape, from_checkpoint

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
SCHEMA = "edgeprune.fit/1"


@dataclass
class FitOptions:
    model: str = "default"
    device: str = "cpu"
    targets: search.Targets = field(default_factory=search.Targets)
    fmt: str | None = None
    dtypes: list[str] | None = None
    host: str | None = None
    out: Path = Path("out/fit")
    work: Path | None = None  # where checkpoints and artifacts go (default: out); shared by several fits
    profile_file: Path | None = None
    threads: str | None = None
    budget: str = "params"  # what LSPS spends: "params" or "latency" (units cost their measured decode time)
    recipe: dict = field(default_factory=dict)  # [prune] overrides, e.g. {"recover_steps": 0}
    max_tokens: int | None = None  # PPL tokens (default: the recipe's evaluate.max_tokens)
    measure_tables: bool | None = None  # None: only when a speed target is set
    # speed predictions x measured / predicted of the dense artifact, profiled first in the same run: the latency
    # table's machine state (load, clocks) cancels out. ``scale``: such factors known already (skips the anchor)
    anchor: bool = True
    scale: dict | None = None
    # the recipe and texts of a run config (`edgeprune run` with [fit]); None: demo.toml's, with ``recipe`` overrides
    prune: object | None = None  # a PruneConfig (its ratio is ignored)
    data: dict | None = None  # {"calib": spec, "eval": spec}
    evaluate: dict | None = None  # seq_len, batch_size, max_tokens, threads
    load: dict = field(default_factory=dict)  # edgeprune.models.load's device / dtype


# ---- recipe, texts --------------------------------------------------------------------------------------------
def recipe(overrides: dict, unit_cost=None):
    """The product's default pruning recipe (demo.toml's [prune]) with overrides, its calibration and
    evaluation text specs and PPL settings."""
    from dataclasses import fields

    from edgeprune.io import read_toml
    from edgeprune.prune import PruneConfig

    cfg = read_toml(RECIPE, "run config")
    known = {f.name for f in fields(PruneConfig)}
    section = {**cfg.get("prune", {}), **overrides}
    bad = sorted(set(overrides) - known)
    if bad:
        raise EdgePruneError(f"unknown prune setting(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    pcfg = PruneConfig(**{k: v for k, v in section.items() if k in known})
    if unit_cost is not None:
        pcfg.unit_cost = unit_cost
    pcfg.validate()
    return pcfg, cfg.get("data", {}), cfg.get("evaluate", {})


def recipe_of(opts: FitOptions, unit_cost=None):
    """``recipe`` for ``opts``: the run config's recipe and texts where it gives them, else demo.toml's."""
    from dataclasses import replace

    if opts.prune is None or opts.data is None or opts.evaluate is None:
        pcfg, data, ev = recipe(opts.recipe, unit_cost)
    if opts.prune is not None:
        pcfg = replace(opts.prune, unit_cost=unit_cost)
        pcfg.validate()
    return pcfg, (data if opts.data is None else dict(opts.data)), (ev if opts.evaluate is None
                                                                     else dict(opts.evaluate))


# ---- latency models -------------------------------------------------------------------------------------------
def latency_models(opts: FitOptions, prof, fmt: str, dtypes, base: ModelShape, ckpt: Path, settings: dict,
                   runner, measure: bool) -> dict:
    """dtype -> LatencyModel, from the cache or measured now (``measure``); None where neither."""
    models = {}
    for dtype in dtypes:
        key, ident = latency.table_key(prof.name, opts.host, fmt, dtype, base, settings, settings.get("threads"))
        table = latency.load_table(key)
        if table is None and measure:
            _log(f"measuring the latency table of {prof.name} ({fmt} {dtype}): synthetic shapes, once per device "
                 f"and runtime; cached as {latency.cache_root() / key}.json")
            table = latency.measure_table(key, ident, base, ckpt, fmt, dtype, runner, log=_log)
        models[dtype] = latency.LatencyModel.fit(table) if table else None
        if table:
            e = models[dtype].errors["held_out"]["decode_tok_s"]
            _log(f"latency model {fmt} {dtype}: {table['path']} (held-out decode error: mean "
                 f"{100 * (e['mean_abs'] or 0):.1f}%, max {100 * (e['max_abs'] or 0):.1f}%)")
    return models


# ---- device -------------------------------------------------------------------------------------------------
def make_runner(opts: FitOptions, prof, settings: dict):
    """artifact dir -> the profiler's JSON document, run here or shipped to ``--host``."""
    from edgeprune.devices import ship, ssh

    overrides = {"prompt_lengths": settings["prompt_lengths"], "new_tokens": settings["new_tokens"],
                 "threads": settings.get("threads")}
    if opts.host:
        remote = ssh.resolve_remote(prof, opts.host)
        return lambda art: ship.ship(Path(art), prof, remote, overrides=overrides, quiet=True)
    return lambda art: ship.profile_local(Path(art), prof, overrides, quiet=True)


def default_budget(prof, host: str | None) -> float | None:
    from edgeprune.devices import profiler

    b = prof.memory_budget_mb
    if b == "auto":
        return None if host else profiler.resolve_budget("auto")  # "auto" on a remote: only the device knows
    return float(b) if b is not None else None


# ---- realise one configuration ----------------------------------------------------------------------------------
def realise(opts, cand: search.Candidate, ctx: dict) -> dict:
    """Prune, export, evaluate and profile one configuration; predicted (search and actual shapes) vs measured."""
    start = time.perf_counter()
    work = opts.work or opts.out
    model_dir = prune_to(opts, ctx["ckpt"], cand.ratio, ctx["pcfg"], ctx["data"], work)
    art = export_to(model_dir, cand.fmt, cand.dtype, work / f"{tag(cand.ratio, opts.budget)}-{cand.fmt}-{cand.dtype}")
    shape = from_checkpoint(model_dir)
    shaped = search.predict(shape, 0.0, cand.fmt, cand.dtype, ctx["models"], ctx["settings"], opts.targets,
                            extra_bytes=ctx["extra_bytes"], scale=ctx.get("scale")).predicted
    shaped["ppl_ratio"] = cand.predicted["ppl_ratio"]
    _log(f"PPL of {art}")
    ppl = artifact_ppl(art, cand.fmt, ctx["eval_text"], ctx["ev"], ctx["max_tokens"])
    _log(f"profiling {art} on {opts.host or ctx['device']}")
    doc = ctx["runner"](art)
    from edgeprune.io import write_json

    write_json(art.parent / "profile.json", doc)
    measured = measured_values(doc, opts.targets.prompt_tokens, ppl, ctx["ref_ppl"])
    return {"ratio": cand.ratio, "format": cand.fmt, "dtype": cand.dtype, "checkpoint": str(model_dir),
            "artifact": str(art), "predicted": cand.predicted, "predicted_from_shapes": shaped,
            "measured": measured, "missed": search.misses(_as_targets(measured), opts.targets),
            "memory_check": doc.get("memory_check"), "seconds": round(time.perf_counter() - start, 1)}


def _as_targets(measured: dict) -> dict:
    return {k: v for k, v in measured.items() if v is not None}


def corrections(attempt: dict) -> dict:
    """measured / the search's prediction for the measured configuration (anchor included), for the quantities a
    miss can be corrected by. Not the prediction from the pruned model's actual shapes: LSPS allocates unevenly, so
    those differ from the search's (uniform) shapes, and a correction by them left the missed configuration itself
    predicted to meet (measured: 0.30 predicted 133.0 tok/s, from its shapes 132.7, measured 132.3 for >= 132.5,
    and the step chose 0.30 again)."""
    p, m = attempt["predicted"], attempt["measured"]
    out = {}
    for name, key in (("decode", "decode_tok_s"), ("ttft", "ttft_ms"), ("memory", "memory_mb")):
        if p.get(key) and m.get(key):
            out[name] = m[key] / p[key]
    return out


# ---- the command ------------------------------------------------------------------------------------------------
def prepare(opts: FitOptions) -> dict:
    """Everything the search and ``realise`` need: profile, format, dtypes, shapes, latency models, recipe, texts,
    the device runner and every candidate's predictions."""
    from edgeprune.devices import profiles
    from edgeprune.export.artifacts import TOKENIZER_FILES, resolve_checkpoint

    opts.targets.validate()
    prof = profiles.load(opts.device, opts.profile_file)
    fmt = opts.fmt or prof.preferred_format
    if fmt not in search.FORMAT_DTYPES:
        raise EdgePruneError(f"unknown format '{fmt}'; choose from gguf, onnx")
    prof.check_format(fmt)
    dtypes = list(opts.dtypes or search.DEFAULT_DTYPES[fmt])
    bad = [d for d in dtypes if d not in search.FORMAT_DTYPES[fmt]]
    if bad:
        raise EdgePruneError(f"{fmt} takes dtypes {', '.join(search.FORMAT_DTYPES[fmt])}, not {', '.join(bad)}")
    if opts.budget not in ("params", "latency"):
        raise EdgePruneError(f"--budget is 'params' or 'latency', not '{opts.budget}'")
    opts.targets.budget_mb = default_budget(prof, opts.host)  # else the profiler would refuse the artifact
    pcfg, data, ev = recipe_of(opts)
    ckpt = resolve_checkpoint(opts.model)
    base = from_checkpoint(ckpt)
    settings = profile_settings(prof, {"threads": opts.threads})
    settings["threads"] = opts.threads if opts.threads is not None else prof.threads
    if opts.targets.prompt_tokens:
        settings["prompt_lengths"] = sorted({*settings["prompt_lengths"], opts.targets.prompt_tokens})
    runner = make_runner(opts, prof, settings)
    speed = opts.targets.min_decode_tok_s is not None or opts.targets.max_ttft_ms is not None
    measure = speed if opts.measure_tables is None else opts.measure_tables
    models = latency_models(opts, prof, fmt, dtypes, base, ckpt, settings, runner, measure or opts.budget == "latency")
    unit_cost = None
    if opts.budget == "latency":
        if models.get(dtypes[0]) is None:
            raise EdgePruneError("--budget latency needs the device's latency table")
        unit_cost = [list(x) for x in zip(*models[dtypes[0]].unit_ms(base), strict=True)]
        pcfg, data, ev = recipe_of(opts, unit_cost)
    extra = sum((ckpt / n).stat().st_size for n in TOKENIZER_FILES if (ckpt / n).is_file())
    extra += 2048  # manifest.json
    scale = dict(opts.scale or {})
    cands = search.candidates(base, fmt, dtypes, models, settings, opts.targets, pcfg.round_to, extra_bytes=extra,
                              unit_cost=unit_cost, scale=scale)
    max_tokens = opts.max_tokens if opts.max_tokens is not None else (ev.get("max_tokens") or None)
    return {"prof": prof, "fmt": fmt, "dtypes": dtypes, "base": base, "cands": cands, "ckpt": ckpt, "pcfg": pcfg,
            "data": data, "ev": ev, "models": models, "settings": settings, "runner": runner,
            "max_tokens": max_tokens, "device": prof.name, "extra_bytes": extra, "unit_cost": unit_cost,
            "scale": scale}


def anchor(opts: FitOptions, ctx: dict) -> dict:
    """Profile the dense model in each dtype (each has its own table, measured at its own time) and return
    measured / predicted decode speed and TTFT per dtype ("decode:q8_0", ...). The profiles are kept in
    ``ctx["anchor_docs"]`` (``anchor_points`` adds their PPL once the evaluation text is loaded)."""
    work = opts.work or opts.out
    out = {}
    ctx["anchor_docs"] = []
    for dtype in ctx["dtypes"]:
        if ctx["models"].get(dtype) is None:
            continue
        art = export_to(ctx["ckpt"], ctx["fmt"], dtype, work / f"r00-{ctx['fmt']}-{dtype}")
        _log(f"profiling the dense {ctx['fmt']} {dtype} artifact on {opts.host or ctx['device']} (the anchor of "
             f"the speed predictions)")
        doc = ctx["runner"](art)
        ctx["anchor_docs"].append((dtype, art, doc))
        out.update(anchor_factors(doc, ctx, dtype, opts.targets))
    return out


def anchor_points(opts: FitOptions, ctx: dict) -> list[dict]:
    """The dense artifacts the anchor profiled, with their PPL in the runtime: measured configurations too
    (the quality-vs-speed frontier's dense end)."""
    out = []
    for dtype, art, doc in ctx.get("anchor_docs", []):
        _log(f"PPL of {art}")
        ppl = artifact_ppl(art, ctx["fmt"], ctx["eval_text"], ctx["ev"], ctx["max_tokens"])
        out.append({"ratio": 0.0, "format": ctx["fmt"], "dtype": dtype, "artifact": str(art),
                    "measured": measured_values(doc, opts.targets.prompt_tokens, ppl, ctx["ref_ppl"])})
    return out


def anchor_factors(doc: dict, ctx: dict, dtype: str, targets: search.Targets) -> dict:
    """measured / predicted speed of the dense artifact in ``dtype`` from its profile document."""
    pred = search.predict(ctx["base"], 0.0, ctx["fmt"], dtype, ctx["models"], ctx["settings"], targets,
                          extra_bytes=ctx["extra_bytes"]).predicted
    out = {}
    if pred.get("decode_tok_s"):
        out[f"decode:{dtype}"] = latency.best_decode_tok_s(doc) / pred["decode_tok_s"]
    if pred.get("ttft_ms") and targets.prompt_tokens:
        out[f"ttft:{dtype}"] = latency.best_ttft_ms(doc)[targets.prompt_tokens] / pred["ttft_ms"]
    return out


def evaluation(opts: FitOptions, ctx: dict) -> None:
    """Load the evaluation text and the dense model's PPL into ``ctx`` (before ``realise``)."""
    ctx["eval_text"] = resolve_text(ctx["data"].get("eval", "builtin"), "eval")
    (opts.work or opts.out).mkdir(parents=True, exist_ok=True)
    ctx["ref_ppl"] = dense_ppl(opts, ctx["eval_text"], ctx["ev"], ctx["max_tokens"])


def fit(opts: FitOptions) -> dict:
    ctx = prepare(opts)
    prof, fmt, dtypes, base, cands = ctx["prof"], ctx["fmt"], ctx["dtypes"], ctx["base"], ctx["cands"]
    models, settings, pcfg, extra, unit_cost = (ctx[k] for k in ("models", "settings", "pcfg", "extra_bytes",
                                                                   "unit_cost"))
    speed = opts.targets.min_decode_tok_s is not None or opts.targets.max_ttft_ms is not None
    if opts.anchor and speed and not opts.scale and models.get(dtypes[0]) is not None:
        ctx["scale"] = anchor(opts, ctx)
        _log(f"anchor: measured / predicted dense speed {json.dumps({k: round(v, 3) for k, v in ctx['scale'].items()})}")
        cands = search.candidates(base, fmt, dtypes, models, settings, opts.targets, pcfg.round_to,
                                  extra_bytes=extra, unit_cost=unit_cost, scale=ctx["scale"])
    choice = search.choose(cands, opts.targets, prof.name)
    _log(f"chosen: {choice.label}; predicted {json.dumps(choice.predicted)}")
    evaluation(opts, ctx)
    anchors = anchor_points(opts, ctx)
    attempts = [realise(opts, choice, ctx)]
    stepped = None
    if attempts[0]["missed"]:
        d = choice.dtype  # the miss corrects the predictions of the dtype that was measured
        scale = {**ctx["scale"], **{f"{k}:{d}": ctx["scale"].get(f"{k}:{d}", ctx["scale"].get(k, 1.0)) * v
                                    for k, v in corrections(attempts[0]).items()}}
        again = search.candidates(base, fmt, dtypes, models, settings, opts.targets, pcfg.round_to,
                                  extra_bytes=extra, scale=scale, unit_cost=unit_cost)
        try:
            nxt = search.choose(again, opts.targets, prof.name, after=choice)
            stepped = {"why": attempts[0]["missed"], "corrections": scale, "next": nxt.label}
            _log(f"measured miss ({', '.join(attempts[0]['missed'])}): stepping once to {nxt.label} "
                 f"(predictions x {json.dumps({k: round(v, 3) for k, v in scale.items()})})")
            attempts.append(realise(opts, nxt, ctx))
        except search.Unreachable as e:
            stepped = {"why": attempts[0]["missed"], "corrections": scale, "next": None, "reason": str(e)}
    final = attempts[-1]
    result = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model": opts.model, "device": prof.name, "host": opts.host, "format": fmt, "dtypes": dtypes,
              "budget": opts.budget, "targets": asdict(opts.targets), "settings": settings, "scale": ctx["scale"],
              "recipe": asdict(pcfg) | {"ratio": None}, "dense_ppl": ctx["ref_ppl"],
              "latency_models": {d: (asdict(m) if m else None) for d, m in models.items()},
              "candidates": [asdict(c) for c in cands], "choice": asdict(choice), "attempts": attempts,
              "stepped": stepped, "met": not final["missed"], "final": final, "anchors": anchors}
    from edgeprune.io import write_json

    opts.out.mkdir(parents=True, exist_ok=True)
    write_json(opts.out / "fit.json", result)
    return result
