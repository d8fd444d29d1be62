"""The report's plots (edgeprune/report.py): parameters and artifact size, perplexity per stage, TTFT / decode /
peak RSS, per-layer allocation and sensitivity, as PNG bytes (matplotlib, Agg), and the Fit section's frontier
(edgeprune/report_fit.py). Does NOT read the run directory: it draws ``report.collect``'s data.
"""

from __future__ import annotations

import io

from edgeprune.report_fit import num as _num
from edgeprune.report_fit import plots as fit_plots


def _bars(ax, labels: list[str], series: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    import numpy as np

    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    colors = {"unpruned": "#7f7f7f", "pruned": "#1f77b4"}
    for i, (name, values) in enumerate(series.items()):
        vals = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name, color=colors.get(name))
        for b, v in zip(bars, values, strict=True):
            if v is not None:
                ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def make_plots(data: dict) -> dict[str, bytes]:
    """PNG bytes per plot name: layers, size, quality, speed (those with data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out: dict[str, bytes] = {}

    def save(fig, name):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[name] = buf.getvalue()

    layers = (data.get("prune") or {}).get("layers") or []
    if layers:
        idx = [lay["index"] for lay in layers]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        w = 0.4
        a1.bar([i - w / 2 for i in idx], [100 * lay.get("removed_attention", 0) for lay in layers], w,
               label="attention", color="#ff7f0e")
        a1.bar([i + w / 2 for i in idx], [100 * lay.get("removed_mlp", 0) for lay in layers], w, label="MLP",
               color="#1f77b4")
        a1.set_ylabel("parameters removed (%)")
        a1.set_title("Allocated pruning per layer", fontsize=10)
        a1.legend(fontsize=8)
        a1.grid(True, axis="y", alpha=0.3)
        plotted = False
        keys = [("sensitivity", "-"), ("block_influence", "--")]
        if all(lay.get("sensitivity") == {k: (lay.get("block_influence") or {}).get(k) for k in ("attention", "mlp")}
               for lay in layers):
            keys = keys[:1]  # sensitivity 'bi' is the Block Influence: one set of lines
        for key, style in keys:
            for part, color in (("attention", "#ff7f0e"), ("mlp", "#1f77b4")):
                ys = [(lay.get(key) or {}).get(part) for lay in layers]
                if any(y is not None for y in ys):
                    a2.plot(idx, [float("nan") if y is None else y for y in ys], style, marker="o", markersize=3,
                            color=color, label=f"{key.replace('_', ' ')} {part}")
                    plotted = True
        a2.set_xlabel("decoder layer")
        a2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a2.set_ylabel("sensitivity")
        a2.set_title("Layer sensitivity (LSPS input) and Block Influence", fontsize=10)
        if plotted:
            a2.legend(fontsize=8)
        a2.grid(True, alpha=0.3)
        save(fig, "layers")

    m = data.get("models", {})
    arts = data.get("artifacts", [])
    pairs: dict[str, dict] = {}
    for a in arts:
        pairs.setdefault(f"{a['format']} {a['dtype']}", {})[a["variant"]] = a

    def series(key: str, scale: float = 1.0) -> dict[str, list]:
        return {name: [(_num(p.get(v, {}).get(key)) or 0) * scale if _num(p.get(v, {}).get(key)) is not None
                       else None for p in pairs.values()] for v, name in (("baseline", "unpruned"),
                                                                         ("pruned", "pruned"))}

    if m or pairs:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
        _bars(a1, ["PyTorch fp32"], {name: [m[v]["params"] / 1e6 if v in m else None]
                                     for v, name in (("baseline", "unpruned"), ("pruned", "pruned"))},
              "parameters (M)", "Parameters")
        if pairs:
            _bars(a2, list(pairs), series("size_bytes", 1 / 2**20), "MiB", "Artifact size")
        else:
            a2.axis("off")
        save(fig, "size")

    labels, ppl = [], {"unpruned": [], "pruned": []}
    if m:
        labels.append("PyTorch fp32")
        ppl["unpruned"].append(m.get("baseline", {}).get("ppl"))
        ppl["pruned"].append(m.get("pruned", {}).get("ppl"))
    for label, p in pairs.items():
        if any(_num(a.get("ppl")) is not None for a in p.values()):
            labels.append(label)
            ppl["unpruned"].append(_num(p.get("baseline", {}).get("ppl")))
            ppl["pruned"].append(_num(p.get("pruned", {}).get("ppl")))
    if labels:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        _bars(ax, labels, ppl, "perplexity (lower is better)", "Perplexity per stage")
        save(fig, "quality")

    if any(_num(a.get("ttft_ms")) is not None for a in arts):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        _bars(axes[0], list(pairs), series("ttft_ms"), "ms", "Time to first token (lower is better)")
        _bars(axes[1], list(pairs), series("decode_tokens_per_s"), "tokens/s", "Decode speed (higher is better)")
        _bars(axes[2], list(pairs), series("peak_rss_mib"), "MiB", "Peak RSS (lower is better)")
        save(fig, "speed")
    out.update(fit_plots(data))
    return out
