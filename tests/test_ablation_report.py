"""bench/report.py's ablation table from hand-made rows: the † of rows measured with other PIEM weights than the
shipped ones, and the decode dash of rows no speed pass timed (no model is built, no plot is written)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import report  # noqa: E402
from ablate import shipped_piem_weights  # noqa: E402

TIMED = "speed pass, 3 repeats, 1.0 load"


def _row(method, ppl, shapes, **kw):
    return {"method": method, "ratio": 0.2, "ppl": ppl, "params": 100e6, "decode_tok_s": 20.0, "zeroshot_limit": 0,
            "layer_shapes": shapes, **kw}


def test_dagger_and_decode_dash(monkeypatch):
    monkeypatch.setattr(report, "_plot_ppl", lambda *a, **k: None)
    rows = {
        "dense@0": {"method": "dense", "ratio": 0, "ppl": 64.0, "params": 135e6, "decode_tok_s": 15.0,
                    "decode_measured": TIMED},
        "PIEM+LSPS one-shot@0.2": _row("PIEM+LSPS one-shot", 109.53, [1], piem_weights=shipped_piem_weights(),
                                       decode_measured=TIMED),
        "PIEM+uniform (PIEM alone)@0.2": _row("PIEM+uniform (PIEM alone)", 123.92, [2], decode_measured=TIMED),
        "PIEM+LSPS multi-round (K=2)@0.2": _row("PIEM+LSPS multi-round (K=2)", 108.54, [3], decode_tok_s=5.29,
                                                piem_weights=shipped_piem_weights()),
    }
    text = "\n".join(report.ablation_section({"tokens": 8192, "legacy_piem_weights": [0.1, 0.3, 0.6],
                                              "rows": rows}))
    line = {m: next(x for x in text.splitlines() if x.startswith(f"| {m} |")) for m in
            ("PIEM+LSPS one-shot", "PIEM+uniform (PIEM alone)", "PIEM+LSPS multi-round (K=2)")}
    assert "123.92†" in line["PIEM+uniform (PIEM alone)"]
    assert "109.53 |" in line["PIEM+LSPS one-shot"] and "†" not in line["PIEM+LSPS one-shot"]
    assert "**108.54** |" in line["PIEM+LSPS multi-round (K=2)"]
    # the timing taken during pruning (5.29) is not shown beside the speed pass's; the timed rows keep theirs
    assert "5.3" not in line["PIEM+LSPS multi-round (K=2)"] and line["PIEM+LSPS multi-round (K=2)"].endswith("| – |")
    assert line["PIEM+LSPS one-shot"].endswith("| 20.0 |")
    assert "decode of the 1 rows pruned after the last speed pass" in text


def test_other_model_section(monkeypatch):
    """A --model grid gets its own heading, plot file and no SmolLM2-specific BoolQ paragraph."""
    plots = []
    monkeypatch.setattr(report, "_plot_ppl", lambda series, path, *a, **k: plots.append(path.name))
    rows = {"dense@0": {"method": "dense", "ratio": 0, "ppl": 30.0, "params": 268e6, "decode_tok_s": 9.0},
            "PIEM+LSPS one-shot@0.2": _row("PIEM+LSPS one-shot", 40.0, [1])}
    text = "\n".join(report.ablation_section({"tokens": 8192, "model": "gemma3-270m", "rows": rows}))
    assert text.startswith("## Ablation on Gemma-3-270M") and "--model gemma3-270m" in text.splitlines()[0]
    assert plots == ["ablation-gemma3-270m.png"] and "bench/ablation-gemma3-270m.png" in text
    assert "BoolQ is a yes/no task" not in text


def test_missing_recovery_per_ratio(monkeypatch):
    """The recovered table names, at each ratio it has rows for, the methods that were not distilled there."""
    monkeypatch.setattr(report, "_plot_ppl", lambda *a, **k: None)
    rows = {"dense@0": {"method": "dense", "ratio": 0, "ppl": 30.0, "params": 268e6, "decode_tok_s": 9.0}}
    for method, ratio, ppl in [("PIEM+LSPS one-shot", 0.2, 40.0), ("taylor+uniform (LLM-Pruner)", 0.2, 41.0),
                               ("PIEM+LSPS one-shot", 0.3, 50.0), ("taylor+uniform (LLM-Pruner)", 0.3, 52.0),
                               ("PIEM+LSPS one-shot + distillation", 0.2, 35.0),
                               ("taylor+uniform (LLM-Pruner) + distillation", 0.2, 36.0),
                               ("taylor+uniform (LLM-Pruner) + distillation", 0.3, 45.0)]:
        recovery = {"seconds": 600.0, "tokens": 51200, "config": {"steps": 100, "batch_size": 4, "lr": 0.002,
                                                                   "lr_rule": "rms"}} if "distillation" in method else None
        rows[f"{method}@{ratio:g}"] = dict(_row(method, ppl, [1]), ratio=ratio, recovery=recovery)
    text = "\n".join(report.ablation_section({"tokens": 8192, "model": "gemma3-270m", "rows": rows}))
    missing = [x for x in text.splitlines() if x.startswith("Not distilled")]
    assert missing == ["Not distilled at 30% (CPU time): PIEM+LSPS one-shot; the comparison above covers the "
                       "recovered rows only."]


def test_pipeline_runs_section_is_the_runs_report_table():
    """bench/pipeline_runs.py's runs render as the report's own table, with the not-exported note and the loads."""
    gguf = {"variant": "pruned", "format": "gguf", "dtype": "q8_0", "skipped": "cannot export this checkpoint"}
    data = {"model": "gemma3-270m", "device": "cpu", "run_dir": "out/pipeline/x",
            "prune": {"config": {"ratio": 0.2, "scorer": "piem", "allocator": "uniform"}},
            "models": {"baseline": {"params": 268e6, "ppl": 47.61, "ppl_text": "wiki", "ppl_seq_len": 128,
                                    "ppl_tokens": 8192},
                       "pruned": {"params": 248e6, "ppl": 91.65}},
            "artifacts": [gguf]}
    text = "\n".join(report.pipeline_runs_section({"runs": {"x": {
        "command": "edgeprune run --model gemma3-270m", "profile_load": {"baseline-gguf-q8_0": [2.99, 2.84]},
        "report": data}}}))
    assert "### x" in text and "`edgeprune run --model gemma3-270m`" in text
    assert "| unpruned | PyTorch fp32 | 268.0M |" in text and "91.65" in text
    assert "Not exported, pruned GGUF q8_0: cannot export this checkpoint." in text
    assert "baseline-gguf-q8_0 3.0 / 2.8" in text
