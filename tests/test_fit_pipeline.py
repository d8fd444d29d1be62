"""`edgeprune run` with a ``[fit]`` section on a tiny model: fit runs as a stage and chooses the ratio, the prune
stage takes its checkpoint, a rerun recomputes nothing, other targets that lead to the same choice recompute the
fit only; the report's Fit section (targets, choice, predicted vs measured, the frontier plot) is read from the
fit stage. Config errors are one line before any work."""

import json

import pytest
from conftest import save_tiny_llama

from edgeprune.errors import EdgePruneError
from edgeprune.pipeline import load_config, plan, run_pipeline
from edgeprune.report_fit import frontier

TOML = """
[run]
model = "{model}"
out = "{out}"

[prune]
ratio = 0.5
n_samples = 8
seq_len = 64
rounds = 1
reconstruct = true
recover_steps = 0

[evaluate]
seq_len = 64
max_tokens = 512
threads = 1

[export]
artifacts = ["gguf:f32"]

[profile]
prompt_tokens = 16
new_tokens = 4
repeats = 1
threads = 1

[report]
ablation = ""

[fit]
max_size_mb = {size}
dtypes = ["f32"]
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fitrun")
    save_tiny_llama(root)
    return root


def _config(root, size, name="tiny.toml", out="run"):
    path = root / name
    path.write_text(TOML.format(model=root / "tiny", out=root / out, size=size))
    return path


@pytest.fixture(scope="module")
def first(tiny, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    return run_pipeline(load_config(_config(tiny, 0.7)), progress=False)


def test_fit_stage_chooses_the_ratio(first):
    s = first.statuses
    assert s["fit"] == "computed" and s["prune"] == "computed" and set(s.values()) == {"computed"}
    fit = first.results["fit"]
    a = fit["final"]
    # 0.81 MiB dense f32: 0.7 MiB needs some pruning; prune.ratio (0.5) is not used
    assert fit["met"] and 0.05 <= a["ratio"] <= 0.25 and a["dtype"] == "f32"
    assert a["measured"]["size_mb"] <= 0.7
    prune = first.results["prune"]
    assert prune["config"]["ratio"] == a["ratio"] and prune["chosen_by"].startswith("fit: gguf f32")
    run = first.run_dir
    assert (run / "stages" / "prune" / "model" / "config.json").is_file()
    assert (run / "stages" / "fit" / "fit.json").is_file()
    # the pruned model's pipeline stages measured fit's checkpoint
    assert first.results["eval-pruned"]["params"]["total"] < first.results["eval-baseline"]["params"]["total"]
    md = (run / "report" / "report.md").read_text()
    assert "## Fit: targets and the chosen configuration" in md and "artifact size ≤ 0.7 MiB" in md
    assert f"ratio {a['ratio']:.2f}, gguf f32" in md and "(chosen by fit)" in md
    assert f"| {a['measured']['size_mb']:.4g} |" in md  # measured size in the predicted-vs-measured table
    report = json.loads((run / "report" / "report.json").read_text())
    assert "frontier" in report["plots"]
    assert (run / "report" / report["plots"]["frontier"]).read_bytes()[:4] == b"\x89PNG"


def test_rerun_and_changed_target(first, tiny):
    again = run_pipeline(load_config(_config(tiny, 0.7)), progress=False)
    assert set(again.statuses.values()) == {"cached"}
    # a slightly different target with the same choice (between the chosen configuration's predicted and measured
    # size and 0.7: the next smaller ratio misses both): fit recomputes (it reuses its pruned checkpoints), the
    # prune stage and everything after it stay cached
    fit = first.results["fit"]
    size = round((max(fit["final"]["predicted"]["size_mb"], fit["final"]["measured"]["size_mb"]) + 0.7) / 2, 4)
    assert size < 0.7
    other = run_pipeline(load_config(_config(tiny, size)), progress=False)
    assert other.results["fit"]["final"]["ratio"] == first.results["fit"]["final"]["ratio"]
    assert other.statuses["fit"] == "computed" and other.statuses["prune"] == "cached"
    assert other.statuses["eval-pruned"] == "cached" and other.statuses["report"] == "computed"
    md = (first.run_dir / "report" / "report.md").read_text()
    # the report (computed after cached stages) has the pruned model's rows and the new target
    assert f"artifact size ≤ {size} MiB" in md and f"| pruned {other.results['fit']['final']['ratio']:.0%} | GGUF fp32 |" in md


def test_unreachable_target_is_one_line_naming_the_config_key(tiny):
    with pytest.raises(EdgePruneError) as e:
        run_pipeline(load_config(_config(tiny, 0.01, "small.toml", out="small")), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("stage fit failed: fit.max_size_mb 0.01 is out of reach on device 'cpu'")
    assert not (tiny / "small" / "fit-work" / "r05").exists()  # nothing was pruned


@pytest.mark.parametrize("item, needle", [
    ("fit.max_size_mb=-1", "must be positive"),
    ("fit.nonsense=1", "unknown key fit.nonsense"),
    ("fit.max_size_mb='big'", "fit.max_size_mb must be a number"),
    ("fit.budget=joules", "fit.budget is 'params' or 'latency'"),
    ("fit.dtypes=['int8']", "fit.dtypes: gguf takes"),
    ("fit.max_ttft_ms=100", "--prompt-tokens"),
    ("fit.device=nosuchdevice", "nosuchdevice"),
])
def test_fit_config_errors_are_one_line(tiny, item, needle):
    with pytest.raises(EdgePruneError) as e:
        plan(load_config(_config(tiny, 0.7, "err.toml"), [item]), progress=False)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fit_section_without_target_is_an_error(tiny):
    cfg = load_config(_config(tiny, 0, "none.toml"), ["fit.dtypes=[]", "fit.device=cpu"])
    with pytest.raises(EdgePruneError, match=r"\[fit\] sets no target"):
        plan(cfg, progress=False)
    names = [s.name for s in plan(load_config(_config(tiny, 0, "none.toml"), ["fit.dtypes=[]"]),
                                  progress=False)]
    assert "fit" not in names and "prune" in names  # no target: the fixed-ratio prune


def test_frontier_keeps_the_undominated_points():
    pts = [{"label": "a", "decode_tok_s": 50, "ppl": 20}, {"label": "b", "decode_tok_s": 60, "ppl": 25},
           {"label": "c", "decode_tok_s": 55, "ppl": 30}, {"label": "d", "decode_tok_s": 70, "ppl": 40},
           {"label": "e", "decode_tok_s": 45, "ppl": 22}, {"label": "f", "decode_tok_s": None, "ppl": 1}]
    assert [p["label"] for p in frontier(pts)] == ["d", "b", "a"]


def _fit_result():
    """A fit stage result with an anchor, a measured miss and the step (distinctive numbers, no model)."""
    def attempt(ratio, pred_tps, tps, ppl, missed):
        return {"ratio": ratio, "format": "gguf", "dtype": "q8_0", "artifact": f"r{ratio}", "seconds": 1.0,
                "predicted_from_shapes": {"memory_mb": 190.5, "size_mb": 100.25, "decode_tok_s": pred_tps,
                                          "ppl_ratio": 1.5372},
                "measured": {"memory_mb": 191.25, "size_mb": 100.5, "decode_tok_s": tps, "ppl": ppl,
                             "ppl_ratio": ppl / 50.0}, "missed": missed}
    cands = [{"ratio": r, "fmt": "gguf", "dtype": "q8_0",
              "predicted": {"decode_tok_s": 40 + 100 * r, "ppl_ratio": 1 + r}} for r in (0.0, 0.35, 0.4)]
    return {"device": "rpi5", "host": "pi@pi5", "format": "gguf", "dtypes": ["q8_0"], "budget": "params",
            "targets": {"min_decode_tok_s": 77.5, "max_memory_mb": None, "budget_mb": 6144.0}, "dense_ppl": 50.0,
            "met": True, "choice": {"ratio": 0.35, "fmt": "gguf", "dtype": "q8_0", "predicted": {}},
            "attempts": [attempt(0.35, 78.125, 70.375, 123.4567, ["min_decode_tok_s"]),
                         attempt(0.4, 80.5, 79.875, 150.9876, [])],
            "stepped": {"why": ["min_decode_tok_s"], "corrections": {"decode:q8_0": 0.9008},
                        "next": "ratio 0.40, gguf q8_0"},
            "anchors": [{"ratio": 0.0, "format": "gguf", "dtype": "q8_0", "artifact": "r00",
                         "measured": {"decode_tok_s": 41.625, "ppl": 50.75}}],
            "candidates": cands, "scale": {"decode:q8_0": 1.1}}


def test_report_fit_section_from_a_result():
    from edgeprune.report_fit import collect_fit, plots, sections

    fit = collect_fit(_fit_result())
    assert [p["role"] for p in fit["points"]] == ["dense", "chosen", "stepped"]
    assert sorted(fit["predicted_curves"]["q8_0"])[0] == [40.0, 50.0, 0.0]  # predicted PPL = ratio prior x dense
    (_, _, _, info), (_, _, header, rows) = sections({"fit": fit})
    text = "\n".join(" | ".join(r) for r in info + rows)
    assert "rpi5 over SSH (pi@pi5)" in text and "decode ≥ 77.5 tok/s" in text
    assert "chosen | ratio 0.35, gguf q8_0" in text
    assert "yes: the first choice missed decode ≥ 77.5 tok/s; predictions corrected (decode:q8_0 ×0.901), " \
           "stepped to ratio 0.40, gguf q8_0" in text
    assert "ratio 0.35, gguf q8_0 | decode (tok/s) | decode ≥ 77.5 tok/s | 78.12 | 70.38 | -9.9% | MISSED" in text
    assert "ratio 0.40, gguf q8_0 | decode (tok/s) | decode ≥ 77.5 tok/s | 80.5 | 79.88 | -0.8% | met" in text
    assert "ratio 0.40, gguf q8_0 | PPL (runtime) | – | – | 151 |" in text and "191.2" in text
    assert plots({"fit": fit})["frontier"][:4] == b"\x89PNG"
    assert sections({"fit": None}) == [] and plots({}) == {} and collect_fit(None) is None
