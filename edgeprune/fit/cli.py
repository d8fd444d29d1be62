"""The command-line side of ``edgeprune fit``: option parsing into ``run.FitOptions``, the predicted-vs-measured
summary and the exit codes (0 met, 2 unreachable or a user mistake, 3 measured miss after the step). The typer
command in ``edgeprune/cli.py`` only forwards its options here."""

from __future__ import annotations

import math
from pathlib import Path

from edgeprune.errors import EdgePruneError
from edgeprune.fit import search
from edgeprune.fit.run import FitOptions, fit


def summary(result: dict) -> list[str]:
    """Predicted vs measured for every target, one line each, per attempt."""
    lines = []
    t = search.Targets(**result["targets"])
    for i, a in enumerate(result["attempts"], 1):
        head = "chosen" if i == 1 else "stepped to"
        lines.append(f"{head}: ratio {a['ratio']:.2f}, {a['format']} {a['dtype']} -> {a['artifact']}")
        rows = [("memory (peak RSS, MiB)", "memory_mb", "max_memory_mb"), ("size (MiB)", "size_mb", "max_size_mb"),
                ("decode (tok/s)", "decode_tok_s", "min_decode_tok_s"), ("TTFT (ms)", "ttft_ms", "max_ttft_ms"),
                ("PPL / dense", "ppl_ratio", "max_ppl_ratio")]
        for label, key, target in rows:
            limit = getattr(t, target)
            pred = a["predicted_from_shapes"].get(key)
            meas = a["measured"].get(key)
            if pred is None and meas is None:
                continue
            ok = "" if limit is None else ("  met" if target not in a["missed"] else "  MISSED")
            lim = "" if limit is None else f"  target {'>=' if target.startswith('min') else '<='} {limit:g}"
            lines.append(f"  {label:<22} predicted {_fmt(pred):>9}  measured {_fmt(meas):>9}{lim}{ok}")
        lines.append(f"  PPL {a['measured']['ppl']:.2f} (dense {result['dense_ppl']:.2f}); {a['seconds']:.0f} s")
    if result["stepped"] and result["stepped"].get("next") is None:
        lines.append(f"the first choice missed {', '.join(result['stepped']['why'])} and no further step is "
                     f"predicted to meet the targets: {result['stepped'].get('reason')}")
    return lines


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if isinstance(x, float) and not math.isnan(x) else str(x)


def recipe_overrides(items: list[str]) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise EdgePruneError(f"--set takes KEY=VALUE, not {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def command(model, device, max_memory_mb, min_decode_tok_s, max_ttft_ms, prompt_tokens, max_size_mb, fmt, dtypes,
            max_ppl_ratio, host, out_dir, threads, budget, sets, max_tokens, profile_file, json_path, echo) -> int:
    """`edgeprune fit`: 0 when the measured artifact meets every target, 3 when it still misses one after the
    step (the artifacts stay). An unreachable target raises ``search.Unreachable`` (one line, exit 2)."""
    targets = search.Targets(max_memory_mb, min_decode_tok_s, max_ttft_ms, prompt_tokens, max_size_mb, max_ppl_ratio)
    opts = FitOptions(model=model, device=device, targets=targets, fmt=fmt,
                      dtypes=[d.strip() for d in dtypes.split(",") if d.strip()] if dtypes else None, host=host,
                      out=Path(out_dir), profile_file=profile_file, threads=threads, budget=budget,
                      recipe=recipe_overrides(sets), max_tokens=max_tokens)
    result = fit(opts)
    for line in summary(result):
        echo(line, highlight=False, soft_wrap=True)
    if json_path is not None:
        from edgeprune.io import write_json

        write_json(json_path, result)
    if not result["met"]:
        echo(f"error: the measured artifact misses {', '.join(result['final']['missed'])} (see {opts.out}/fit.json)",
             highlight=False, soft_wrap=True)
        return 3
    echo(f"met every target: {result['final']['artifact']} (details: {opts.out}/fit.json)", highlight=False,
         soft_wrap=True)
    return 0
