"""`edgeprune report RUN_DIR`: what a pipeline run measured, next to the unpruned model, as JSON, Markdown and one
self-contained HTML page (plots embedded as base64 PNG). Every number is read from the run directory's stage
files (``stages/*/stage.json``, ``inputs/ablation.json``); none is typed in.

Here: the tables, Markdown and HTML. The numbers are collected by edgeprune/report_data.py (``collect``, also
reachable as ``report.collect``), the plots are edgeprune/report_plots.py, a run's Fit section
edgeprune/report_fit.py, the README results block edgeprune/report_readme.py.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from edgeprune.io import write_json
from edgeprune.report_data import change, collect, num
from edgeprune.report_fit import notes as fit_notes
from edgeprune.report_fit import sections as fit_sections
from edgeprune.rundir import REPORT, STAGE_FILE, stage_dir

# ------------------------------------------------------------------------------------------------- format


def _f(x: Any, digits: int = 2) -> str:
    x = num(x)
    if x is None:
        return "–"
    if abs(x) >= 1e5:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _pct(x: Any) -> str:
    x = num(x)
    return "–" if x is None else f"{100 * x:+.1f}%"


def _fmt_metric(metric: str, x: Any) -> str:
    if metric == "parameters":
        return "–" if num(x) is None else f"{x / 1e6:.1f}M"
    if metric == "size (bytes)":
        return "–" if num(x) is None else f"{x / 2**20:.1f} MiB"
    if metric == "zero-shot acc":
        return _f(x, 4)
    return _f(x, 2)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def method_summary(p: dict) -> str:
    """The pruning recipe of a prune config in one phrase, e.g. "piem + lsps (bi sensitivity), 2 rounds,
    least-squares refit, 100 distillation steps"."""
    parts = [f"{p.get('scorer', '?')} + {p.get('allocator', '?')}"
             + (f" ({p.get('sensitivity', '?')} sensitivity)" if p.get("allocator") == "lsps" else "")]
    if (p.get("rounds") or 1) > 1:
        parts.append(f"{p['rounds']} rounds")
    if p.get("reconstruct"):
        parts.append("least-squares refit")
    elif p.get("bias_compensation"):
        parts.append("bias compensation")
    if p.get("recover_steps"):
        parts.append(f"{p['recover_steps']} distillation steps")
    return ", ".join(parts)


def _title(data: dict) -> str:
    p = data.get("prune", {}).get("config") or {}
    chosen = " (chosen by fit)" if data.get("fit") else ""
    return f"edgeprune run: {data.get('model')} pruned with {method_summary(p)}, ratio {p.get('ratio', 0):g}{chosen}"


def summary_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """The wide results table (README and report): one row per model and runtime."""
    header = ["model", "format", "params", "size (MiB)", "PPL", "TTFT (ms)", "decode tok/s", "peak RSS (MiB)"]
    machines = any(a.get("measured_on") for a in data.get("artifacts", []))
    if machines:  # which machine measured each profile (run directories of older versions do not say)
        header.append("measured on")
    rows = []
    m = data.get("models", {})
    ratio = (data.get("prune", {}).get("config") or {}).get("ratio")
    names = {"baseline": "unpruned", "pruned": f"pruned {ratio:.0%}" if ratio is not None else "pruned"}
    base = {}

    def rel(v: str, key: str, value: Any, text: str) -> str:
        if v == "baseline":
            base[key] = value
            return text
        c = change(num(base.get(key)), num(value))
        return text if c is None or text == "–" else f"{text} ({100 * c:+.0f}%)"

    for v in ("baseline", "pruned"):
        if v in m:
            rows.append([names[v], "PyTorch fp32", rel(v, "params", m[v]["params"], f"{m[v]['params'] / 1e6:.1f}M"),
                         "–", rel(v, "ppl", m[v]["ppl"], _f(m[v]["ppl"])), "–", "–", "–"] + ["–"] * machines)
    for a in data.get("artifacts", []):
        v = a["variant"]
        k = f"{a['format']}-{a['dtype']}"
        size = a.get("size_bytes")
        fmt = f"{a['format'].upper()} {a['dtype']}" + (" (not exported: see notes)" if a.get("skipped") else "")
        rows.append([names[v], fmt, "–",
                     rel(v, k + "size", size, _f(size / 2**20 if size else None, 1)),
                     rel(v, k + "ppl", a.get("ppl"), _f(a.get("ppl"))),
                     rel(v, k + "ttft", a.get("ttft_ms"), _f(a.get("ttft_ms"), 1)),
                     rel(v, k + "tps", a.get("decode_tokens_per_s"), _f(a.get("decode_tokens_per_s"), 1)),
                     rel(v, k + "rss", a.get("peak_rss_mib"), _f(a.get("peak_rss_mib"), 0))]
                    + [machine_label(a.get("measured_on"))] * machines)
    return header, rows


def machine_label(m: dict | None) -> str:
    """One table cell: the machine that measured a profile, and EMULATED when its timings are no device's."""
    if not m:
        return "–"
    label = f"{m.get('host') or 'this host'} ({m.get('arch') or '?'}"
    return label + (", EMULATED: not device timings)" if m.get("emulated") else ")")


def _sections(data: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(id, title, header, rows) of every table, shared by Markdown and HTML."""
    out = []
    h, r = summary_rows(data)
    out.append(("summary", "Results vs the unpruned model", h, r))
    out += fit_sections(data)
    out.append(("comparison", "Every metric, unpruned vs pruned", ["stage", "metric", "unpruned", "pruned", "change"],
                [[c["stage"], c["metric"], _fmt_metric(c["metric"], c["baseline"]),
                  _fmt_metric(c["metric"], c["pruned"]), _pct(c["change"])] for c in data.get("comparison", [])]))
    m = data.get("models", {})
    tasks = sorted({t for v in m.values() for t in (v.get("zeroshot") or {})})
    if tasks:
        out.append(("zeroshot", "Zero-shot accuracy (PyTorch fp32)", ["task", "unpruned", "pruned", "change"],
                    [[t, _f((m.get("baseline", {}).get("zeroshot") or {}).get(t), 4),
                      _f((m.get("pruned", {}).get("zeroshot") or {}).get(t), 4),
                      _pct(change((m.get("baseline", {}).get("zeroshot") or {}).get(t),
                                   (m.get("pruned", {}).get("zeroshot") or {}).get(t)))] for t in tasks]))
    p = data.get("prune")
    if p:
        pb, pa = p.get("params_before") or {}, p.get("params_after") or {}
        out.append(("params", "Parameters per stage",
                    ["part", "unpruned", "pruned", "change"],
                    [[k, f"{pb[k]:,}", f"{pa[k]:,}", _pct(change(pb[k], pa[k]))]
                     for k in ("embeddings", "lm_head", "attention", "mlp", "norms", "decoder_layers", "total")
                     if k in pb and k in pa]))
        rows = []
        for lay in p["layers"]:
            s, bi = lay.get("sensitivity") or {}, lay.get("block_influence") or {}
            rows.append([str(lay["index"]), f"{lay['heads'][0]}→{lay['heads'][1]}",
                         f"{lay['kv_heads'][0]}→{lay['kv_heads'][1]}",
                         f"{lay['mlp_channels'][0]}→{lay['mlp_channels'][1]}",
                         ", ".join(f"{x:.3f}" for x in lay["allocated_ratio"]) or "–",
                         _pct(-lay["removed_total"]) if "removed_total" in lay else "–",
                         _f(s.get("attention"), 4), _f(s.get("mlp"), 4), _f(bi.get("attention"), 4),
                         _f(bi.get("mlp"), 4)])
        out.append(("layers", "Per-layer sensitivity and allocation",
                    ["layer", "heads", "KV heads", "MLP channels", "allocated ratio", "params change",
                     "sensitivity attn", "sensitivity MLP", "BI attn", "BI MLP"], rows))
    a = data.get("ablation")
    if a and a.get("rows"):
        out.append(("ablation", "Ablation (bench/ablate.py)",
                    ["method", "ratio", "PPL", "zero-shot acc", "params (M)", "decode tok/s"],
                    [[r.get("method", k), _pct(r.get("ratio")).lstrip("+"), _f(r.get("ppl")),
                      _f(r.get("zeroshot_avg_acc"), 4), _f((r.get("params") or 0) / 1e6, 1),
                      _f(r.get("decode_tok_s"), 1)] for k, r in a["rows"].items()]))
    out.append(("stages", "Stages of the run that wrote this report", ["stage", "status", "seconds", "key"],
                [[s["name"], s["status"], _f(data["stage_seconds"].get(s["name"]) or s["seconds"], 1), s["key"]]
                 for s in data.get("stages", [])]))
    return out


def _notes(data: dict) -> list[str]:
    m = data.get("models", {}).get("baseline") or data.get("models", {}).get("pruned")
    notes = []
    if m:
        notes.append(f"PPL: {m['ppl_text']}, seq {m['ppl_seq_len']}, first {m['ppl_tokens']:,} tokens "
                     "(non-overlapping windows); the same tokens for every model and runtime.")
    if data.get("device"):
        notes.append(f"Latency and memory: device profile '{data['device']}'; TTFT = prompt submitted to first "
                     "token, decode tok/s = steady-state generation, peak RSS of the profiling process.")
    notes += _measured_on_notes(data.get("artifacts", []))
    notes += [f"Not exported, {a['variant']} {a['format'].upper()} {a['dtype']}: {a['skipped']}."
              for a in data.get("artifacts", []) if a.get("skipped")]
    notes += fit_notes(data)
    v = data.get("versions") or {}
    if v:
        notes.append("Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".")
    return notes


def _measured_on_notes(artifacts: list[dict]) -> list[str]:
    """Which machine measured each profile (``measured_on``: edgeprune.devices.remote.measured_on); emulated
    timings are said to be no device timings."""
    machines: dict[str, list[str]] = {}
    for a in artifacts:
        m = a.get("measured_on")
        if m:
            where = (f"{m.get('host') or 'this host'} ({m.get('arch')}, {m.get('cpu_model') or 'unknown CPU'}"
                     + (f", {m['board']}" if m.get("board") else "") + ")")
            if m.get("emulated"):
                where += " — EMULATED (qemu-user): functional results only, these timings are not device timings"
            machines.setdefault(where, []).append(f"{a['variant']} {a['format']} {a['dtype']}")
    return [f"Profiles measured on {w}: {', '.join(names)}." for w, names in machines.items()]


def render_markdown(data: dict, plots: dict[str, str] | None = None) -> str:
    lines = [f"# {_title(data)}", "", f"Run directory: `{data['run_dir']}`; generated {data['generated']}.", ""]
    lines += [f"* {n}" for n in _notes(data)] + [""]
    for sid, title, header, rows in _sections(data):
        lines += [f"## {title}", ""] + md_table(header, rows)
        if plots and sid in PLOT_AFTER and PLOT_AFTER[sid] in plots:
            lines += [f"![{PLOT_AFTER[sid]}]({plots[PLOT_AFTER[sid]]})", ""]
    return "\n".join(lines)


PLOT_AFTER = {"summary": "speed", "fit-measured": "frontier", "comparison": "quality", "params": "size",
              "layers": "layers"}

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img.plot{max-width:100%;display:block;margin:.5em 0 1.5em}
code{background:#f3f3f3;padding:0 3px}"""


def render_html(data: dict, plots_b64: dict[str, str]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>{e(_title(data))}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(_title(data))}</h1>",
             f"<p>Run directory: <code>{e(data['run_dir'])}</code>; generated {e(data['generated'])}.</p><ul>"]
    parts += [f"<li>{e(n)}</li>" for n in _notes(data)] + ["</ul>"]
    for sid, title, header, rows in _sections(data):
        parts.append(f"<h2 id='{sid}'>{e(title)}</h2><table><thead><tr>"
                     + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</tbody></table>")
        name = PLOT_AFTER.get(sid)
        if name and name in plots_b64:
            parts.append(f"<img class='plot' id='plot-{name}' alt='{e(name)} plot' "
                         f"src='data:image/png;base64,{plots_b64[name]}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------- write


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.json, report.md (+ plots/*.png) and report.html into ``out_dir`` (default RUN_DIR/report)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else stage_dir(run_dir, REPORT)
    from edgeprune.report_plots import make_plots

    data = collect(run_dir)
    pngs = make_plots(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plots").mkdir(exist_ok=True)
    rel = {}
    for name, png in pngs.items():
        (out_dir / "plots" / f"{name}.png").write_bytes(png)
        rel[name] = f"plots/{name}.png"
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json(paths["json"], {**data, "plots": rel})
    paths["markdown"].write_text(render_markdown(data, rel))
    paths["html"].write_text(render_html(data, {k: base64.b64encode(v).decode() for k, v in pngs.items()}))
    return paths


def regenerate(run_dir: str | Path) -> dict[str, Path]:
    """`edgeprune report RUN_DIR`: rewrite RUN_DIR/report atomically (its stage.json, if any, is kept)."""
    import shutil

    from edgeprune.io import atomic_dir

    run_dir = Path(run_dir)
    collect(run_dir)  # fail before touching anything
    dest = stage_dir(run_dir, REPORT)
    with atomic_dir(dest) as tmp:
        write_report(run_dir, tmp)
        if (dest / STAGE_FILE).is_file():
            shutil.copy2(dest / STAGE_FILE, tmp / STAGE_FILE)
    return {k: dest / p.name for k, p in {"json": tmp / "report.json", "markdown": tmp / "report.md",
                                          "html": tmp / "report.html"}.items()}
