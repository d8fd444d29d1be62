"""The numbers of a pipeline run, collected from its run directory (``stages/*/stage.json``,
``inputs/ablation.json``) into one dict: models, artifacts, the comparison rows, the prune record, fit and the
ablation table. ``report.py`` renders it; nothing here formats or writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from edgeprune.errors import EdgePruneError
from edgeprune.io import MANIFEST
from edgeprune.report_fit import collect_fit
from edgeprune.rundir import ABLATION, REPORT, RUN_KIND, VARIANTS, StageId, read_stages


def num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def change(base: float | None, new: float | None) -> float | None:
    return (new - base) / base if base not in (None, 0) and new is not None else None


def _layers(prune: dict) -> list[dict]:
    """Per original layer: widths before and after, removed share of its parameters, allocated ratio of every
    round, sensitivity and Block Influence of the first round."""
    before = prune.get("shapes_before") or []
    pb = prune.get("layer_params_before") or []
    plan = (prune.get("plan") or {}).get("layers") or []
    kept_params = iter(prune.get("layer_params_after") or [])
    rounds = prune.get("rounds") or []
    sens = (rounds[0].get("sensitivity") or []) if rounds else []
    bi = (rounds[0].get("block_influence") or []) if rounds else []
    out = []
    for i, b in enumerate(before):
        lp = plan[i] if i < len(plan) else None
        drop = bool(lp and lp.get("drop"))
        after_params = None if drop else next(kept_params, None)
        row = {
            "index": i, "dropped": drop,
            "heads": [b["num_heads"], 0 if drop or lp is None else len(lp["heads"])],
            "kv_heads": [b["num_kv_heads"], 0 if drop or lp is None else len(lp["kv_heads"])],
            "mlp_channels": [b["intermediate_size"], 0 if drop or lp is None else len(lp["channels"])],
            "allocated_ratio": [r["allocation"]["layers"][i]["ratio"] for r in rounds
                                if i < len(r.get("allocation", {}).get("layers", []))],
        }
        if i < len(pb):
            a = after_params or {"attention": 0, "mlp": 0, "total": 0}
            for part in ("attention", "mlp", "total"):
                row[f"removed_{part}"] = 1 - a[part] / pb[i][part] if pb[i][part] else 0.0
        if i < len(sens):
            row["sensitivity"] = {"attention": sens[i]["attention"], "mlp": sens[i]["mlp"]}
        if i < len(bi) and bi[i]:
            row["block_influence"] = {k: v for k, v in bi[i].items() if k in ("layer", "attention", "mlp")}
        out.append(row)
    return out


def collect(run_dir: str | Path) -> dict:
    """All the report's numbers, from the run directory."""
    run_dir = Path(run_dir)
    try:
        man = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        raise EdgePruneError(f"{run_dir} is not a run directory (no readable {MANIFEST})") from None
    if man.get("kind") != RUN_KIND:
        raise EdgePruneError(f"{run_dir / MANIFEST} is not an edgeprune run manifest")
    # only the stages of the latest run, as they were then (stale directories of earlier configs are ignored)
    keys = {s["name"]: s["key"] for s in man.get("stages", []) if s.get("key")}
    stages = {name: s for name, s in read_stages(run_dir).items() if keys.get(name) == s.get("key")}
    res = {name: s["result"] for name, s in stages.items()}
    cfg = man.get("config", {})
    data: dict[str, Any] = {
        "run_dir": str(run_dir), "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": cfg.get("run", {}).get("model"), "device": cfg.get("profile", {}).get("device"),
        "config": cfg, "versions": man.get("versions", {}),
        "stages": [{"name": s["name"], "status": s["status"], "seconds": s["seconds"], "key": s["key"]}
                   for s in man.get("stages", []) if s["name"] != REPORT],
        "stage_seconds": {name: s.get("seconds") for name, s in stages.items()},
    }
    p = res.get("prune")
    if p:
        data["prune"] = {
            "config": p.get("config"), "calibration": p.get("calibration"),
            "params_before": p.get("params_before"), "params_after": p.get("params_after"),
            "decoder_reduction": p.get("decoder_reduction"), "total_reduction": p.get("total_reduction"),
            "seconds": p.get("seconds"), "peak_rss_mib": p.get("peak_rss_mib"), "layers": _layers(p),
        }
    models = {}
    for v in VARIANTS:
        e = res.get(StageId("eval", v).name)
        if e:
            z = e.get("zeroshot")
            models[v] = {"params": e["params"]["total"], "decoder_params": e["params"]["decoder_layers"],
                         "ppl": e["ppl"]["ppl"], "ppl_text": e["ppl"]["text"], "ppl_seq_len": e["ppl"]["seq_len"],
                         "ppl_tokens": e["ppl"]["tokens_scored"],
                         "zeroshot": {t: r["acc"] for t, r in z["tasks"].items()} if z else None,
                         "zeroshot_avg": z["average"]["acc"] if z else None,
                         "zeroshot_limit": z.get("limit") if z else None}
    data["models"] = models
    artifacts = []
    for name, r in res.items():
        v, fmt, dtype = r.get("variant"), r.get("format"), r.get("dtype")
        if name != StageId("export", v, fmt, dtype).name or v not in VARIANTS:
            continue  # not an export stage (each export result names its own variant, format and dtype)
        row = {"variant": v, "format": fmt, "dtype": dtype, "size_bytes": r.get("size_bytes"),
               "skipped": r.get("skipped"),
               "parity_passed": r.get("parity", {}).get("passed"),
               "parity_max_abs_logit_diff": r.get("parity", {}).get("max_abs_logit_diff")}
        ppl = res.get(StageId("ppl", v, fmt, dtype).name)
        if ppl:
            row["ppl"] = ppl.get("ppl")
        prof = res.get(StageId("profile", v, fmt, dtype).name)
        if prof:
            row.update(ttft_ms=prof.get("ttft_ms"), decode_tokens_per_s=prof.get("decode_tokens_per_s"),
                       peak_rss_mib=prof.get("peak_rss_mib"), device=prof.get("device"),
                       measured_on=prof.get("measured_on"))
        artifacts.append(row)
    order = {"baseline": 0, "pruned": 1}
    artifacts.sort(key=lambda a: (a["format"], a["dtype"], order[a["variant"]]))
    data["artifacts"] = artifacts
    data["comparison"] = _comparison(models, artifacts)
    data["fit"] = collect_fit(res.get("fit"))
    abl = run_dir / ABLATION
    data["ablation"] = json.loads(abl.read_text()) if abl.is_file() else None
    return data


def _comparison(models: dict, artifacts: list[dict]) -> list[dict]:
    """One row per (runtime, metric): unpruned, pruned, relative change."""
    rows = []
    b, p = models.get("baseline", {}), models.get("pruned", {})
    for metric, key in (("parameters", "params"), ("PPL", "ppl"), ("zero-shot acc", "zeroshot_avg")):
        if b.get(key) is not None or p.get(key) is not None:
            rows.append({"stage": "PyTorch fp32", "metric": metric, "baseline": b.get(key), "pruned": p.get(key),
                         "change": change(b.get(key), p.get(key))})
    pairs: dict[tuple[str, str], dict] = {}
    for a in artifacts:
        pairs.setdefault((a["format"], a["dtype"]), {})[a["variant"]] = a
    for (fmt, dtype), pair in pairs.items():
        for metric, key in (("size (bytes)", "size_bytes"), ("PPL", "ppl"), ("TTFT (ms)", "ttft_ms"),
                            ("decode tokens/s", "decode_tokens_per_s"), ("peak RSS (MiB)", "peak_rss_mib")):
            bv, pv = (num(pair.get(v, {}).get(key)) for v in ("baseline", "pruned"))
            if bv is not None or pv is not None:
                rows.append({"stage": f"{fmt} {dtype}", "metric": metric, "baseline": bv, "pruned": pv,
                             "change": change(bv, pv)})
    return rows
