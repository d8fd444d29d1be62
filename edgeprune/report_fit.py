"""The report's Fit section (a run with a ``[fit]`` section): the targets, the chosen ratio and dtype, predicted vs
measured for every target and configuration, whether fit stepped once more, and the quality (PPL) vs decode speed
plot of every configuration fit measured, with its Pareto frontier. Every number is read from the fit stage's
result (``edgeprune.fit/1``, as `edgeprune fit` writes fit.json); ``frontier_png`` also draws bench/fit.py's plot.

Does NOT measure anything, and reads no file: edgeprune/report.py passes the stage result in.
"""

from __future__ import annotations

import io
import math
from typing import Any

# (key in predictions / measurements, label, target field, unit)
QUANTITIES = (("memory_mb", "peak RSS (MiB)", "max_memory_mb"),
              ("memory_check_mb", "profiler memory check (MiB)", "budget_mb"),
              ("size_mb", "artifact size (MiB)", "max_size_mb"),
              ("decode_tok_s", "decode (tok/s)", "min_decode_tok_s"),
              ("ttft_ms", "TTFT (ms)", "max_ttft_ms"),
              ("ppl_ratio", "PPL / dense PPL", "max_ppl_ratio"))
TARGET_LABELS = {"max_memory_mb": "peak RSS ≤ {} MiB", "budget_mb": "profiler memory check ≤ {} MiB (device budget)",
                 "min_decode_tok_s": "decode ≥ {} tok/s", "max_ttft_ms": "TTFT ≤ {} ms",
                 "max_size_mb": "artifact size ≤ {} MiB", "max_ppl_ratio": "PPL ≤ {} × dense"}


def num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _g(x: Any) -> str:
    x = num(x)
    return "–" if x is None else (f"{x:.0f}" if abs(x) >= 1e4 else f"{x:.4g}")


def _label(c: dict) -> str:
    return f"ratio {c['ratio']:.2f}, {c['format']} {c['dtype']}"


def collect_fit(r: dict | None) -> dict | None:
    """The Fit section's data from the fit stage's result (None without one)."""
    if not r:
        return None
    targets = {k: v for k, v in (r.get("targets") or {}).items() if v is not None}
    points = [{"label": f"dense {a['dtype']}", "role": "dense", **_point(a)} for a in r.get("anchors") or []]
    for i, a in enumerate(r.get("attempts") or []):
        points.append({"label": _label(a), "role": "chosen" if i == 0 else "stepped", **_point(a)})
    curves: dict[str, list] = {}
    dense_ppl = num(r.get("dense_ppl"))
    for c in r.get("candidates") or []:
        p = c.get("predicted") or {}
        if num(p.get("decode_tok_s")) is not None and dense_ppl:
            curves.setdefault(c["dtype"], []).append([p["decode_tok_s"], p["ppl_ratio"] * dense_ppl, c["ratio"]])
    return {"device": r.get("device"), "host": r.get("host"), "format": r.get("format"), "dtypes": r.get("dtypes"),
            "budget": r.get("budget"), "targets": targets, "dense_ppl": dense_ppl, "met": r.get("met"),
            "choice": {k: r["choice"][k] for k in ("ratio", "fmt", "dtype", "predicted")} if r.get("choice") else None,
            "attempts": [{k: a.get(k) for k in ("ratio", "format", "dtype", "predicted_from_shapes", "measured",
                                                 "missed", "artifact", "seconds")} for a in r.get("attempts") or []],
            "stepped": r.get("stepped"), "scale": r.get("scale"), "points": points, "predicted_curves": curves}


def _point(a: dict) -> dict:
    m = a.get("measured") or {}
    return {"ratio": a["ratio"], "dtype": a["dtype"], "decode_tok_s": m.get("decode_tok_s"), "ppl": m.get("ppl")}


def _limit(name: str, value: float) -> str:
    return TARGET_LABELS.get(name, name + " {}").format(f"{value:g}")


def _stepped_text(fit: dict) -> str:
    s = fit.get("stepped")
    if not s:
        return "no (the first choice met every target)" if fit.get("met") else "no"
    why = ", ".join(_limit(n, fit["targets"][n]) for n in s.get("why", []) if n in fit["targets"])
    corr = ", ".join(f"{k} ×{v:.3f}" for k, v in (s.get("corrections") or {}).items())
    if s.get("next"):
        return f"yes: the first choice missed {why}; predictions corrected ({corr}), stepped to {s['next']}"
    return f"the first choice missed {why}; no further configuration is predicted to meet the targets: " \
           f"{s.get('reason')}"


def sections(data: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(id, title, header, rows) of the Fit tables (none without a fit stage)."""
    fit = data.get("fit")
    if not fit:
        return []
    t = fit["targets"]
    where = f"{fit['device']} over SSH ({fit['host']})" if fit.get("host") else f"{fit['device']} (this machine)"
    rows = [["device", where]]
    rows += [["target", _limit(k, v)] for k, v in t.items() if k in TARGET_LABELS]
    if t.get("prompt_tokens"):
        rows.append(["TTFT prompt", f"{t['prompt_tokens']} tokens"])
    rows.append(["searched", f"{fit['format']} {', '.join(fit.get('dtypes') or [])}; pruning ratios 0 to 0.70; "
                             f"LSPS {fit.get('budget')} budget"])
    c = fit.get("choice")
    if c:
        rows.append(["chosen", f"ratio {c['ratio']:.2f}, {c['fmt']} {c['dtype']}"])
    rows.append(["stepped once more", _stepped_text(fit)])
    final = fit["attempts"][-1] if fit["attempts"] else None
    if final:
        rows.append(["result", (f"met every target: ratio {final['ratio']:.2f}, {final['format']} {final['dtype']}"
                                if fit.get("met") else f"MISSED {', '.join(final.get('missed') or [])} (ratio "
                                f"{final['ratio']:.2f}, {final['format']} {final['dtype']})")])
    out = [("fit", "Fit: targets and the chosen configuration", ["", "value"], rows)]
    rows = []
    for a in fit["attempts"]:
        p, m = a.get("predicted_from_shapes") or {}, a.get("measured") or {}
        for key, label, target in QUANTITIES:
            pv, mv = num(p.get(key)), num(m.get(key))
            if pv is None and mv is None:
                continue
            limit = t.get(target)
            err = f"{100 * (mv / pv - 1):+.1f}%" if pv and mv is not None else "–"
            ok = "–" if limit is None else ("MISSED" if target in (a.get("missed") or []) else "met")
            rows.append([_label(a), label, "–" if limit is None else _limit(target, limit),
                         _g(pv), _g(mv), err, ok])
        rows.append([_label(a), "PPL (runtime)", "–", "–", _g(m.get("ppl")), "–",
                     f"dense PyTorch {_g(fit.get('dense_ppl'))}"])
    out.append(("fit-measured", "Fit: predicted vs measured", ["configuration", "quantity", "target", "predicted",
                                                               "measured", "measured vs predicted", "result"], rows))
    return out


def notes(data: dict) -> list[str]:
    fit = data.get("fit")
    if not fit:
        return []
    return ["Fit: predictions are made from the shapes and dtype before pruning (memory: the profiler's own check; "
            "speed: the device's latency model, scaled by the dense artifact's measured / predicted speed in the same "
            "run; PPL / dense: a prior, exp(1.2 × ratio) × the dtype's cost); measured speeds are the fastest of the "
            "profiler's repeats. The pipeline's tables below measure the chosen checkpoint again in [export]'s "
            "artifacts (medians)."]


def frontier(points: list[dict]) -> list[dict]:
    """The measured points no other point beats on both decode speed (higher) and PPL (lower), fastest first."""
    have = sorted((p for p in points if num(p.get("decode_tok_s")) is not None and num(p.get("ppl")) is not None),
                  key=lambda p: (-p["decode_tok_s"], p["ppl"]))
    out, best = [], math.inf
    for p in have:
        if p["ppl"] < best:
            out.append(p)
            best = p["ppl"]
    return out


def frontier_png(points: list[dict], curves: dict | None = None, targets: dict | None = None,
                 dense_ppl: float | None = None, title: str = "Quality vs decode speed of the measured "
                 "configurations") -> bytes | None:
    """PPL (lower is better) vs decode tok/s (higher is better) of measured configurations (``label``, ``role``,
    ``decode_tok_s``, ``ppl``), their Pareto frontier, fit's predicted curve per dtype (``curves``: dtype ->
    [decode, PPL, ratio] rows) and the speed / quality targets (``min_decode_tok_s``: one value or a list). None
    when no point has both values."""
    pts = [p for p in points if num(p.get("decode_tok_s")) is not None and num(p.get("ppl")) is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6))
    for dtype, rows in sorted((curves or {}).items()):
        rows = sorted(rows)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], ":", color="#999999" if dtype.startswith("q8")
                else "#c7a0d0", linewidth=1, label=f"predicted, {dtype} (ratio 0 → 0.70)")
    front = frontier(pts)
    ax.plot([p["decode_tok_s"] for p in front], [p["ppl"] for p in front], "-", color="#1f77b4", linewidth=1.5,
            alpha=0.6, label="measured Pareto frontier")
    style = {"dense": ("s", "#7f7f7f"), "chosen": ("o", "#1f77b4"), "stepped": ("D", "#d62728"),
             "naive": ("^", "#ff7f0e")}
    seen = set()
    for p in pts:
        marker, color = style.get(p.get("role"), ("o", "#2ca02c"))
        role = p.get("role") or "measured"
        ax.plot(p["decode_tok_s"], p["ppl"], marker, color=color, markersize=7,
                label=None if role in seen else role)
        seen.add(role)
        ax.annotate(p["label"], (p["decode_tok_s"], p["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    t = targets or {}
    speeds = t.get("min_decode_tok_s") or []
    for v in speeds if isinstance(speeds, list) else [speeds]:
        ax.axvline(v, color="#d62728", linestyle="--", linewidth=1, label=f"target decode ≥ {v:g} tok/s")
    if t.get("max_ppl_ratio") and dense_ppl:
        ax.axhline(t["max_ppl_ratio"] * dense_ppl, color="#9467bd", linestyle="--", linewidth=1,
                   label=f"target PPL ≤ {t['max_ppl_ratio']:g} × dense")
    if dense_ppl:
        ax.axhline(dense_ppl, color="#7f7f7f", linestyle="-.", linewidth=0.8, label="dense PyTorch PPL")
    ax.set_xlabel("decode tokens/s (fastest repeat; higher is better)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plots(data: dict) -> dict[str, bytes]:
    fit = data.get("fit")
    if not fit:
        return {}
    png = frontier_png(fit["points"], fit["predicted_curves"], fit["targets"], fit.get("dense_ppl"))
    return {"frontier": png} if png else {}
