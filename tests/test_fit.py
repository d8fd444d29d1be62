"""edgeprune fit: shapes and predicted file sizes, the memory prediction (the profiler's own check), the latency
model's fit, the search on synthetic predictions, the LSPS latency budget, the one-line unreachable error, and one
slow end-to-end fit on the default model."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from edgeprune.errors import EdgePruneError
from edgeprune.fit import latency, search
from edgeprune.fit.memory import predict_memory
from edgeprune.fit.shapes import LayerShape, ModelShape, at_ratio, file_bytes, from_checkpoint

TINY = ModelShape(hidden=96, head_dim=16, vocab=259, context=256, layers=[LayerShape(6, 2, 128)] * 3,
                  tokenizer_bytes=0, name="tiny")
SETTINGS = {"prompt_lengths": [8, 16], "new_tokens": 4, "decode_prompt": None}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from edgeprune.models.tiny import byte_tokenizer

    d = tmp_path_factory.mktemp("tok")
    byte_tokenizer().save_pretrained(d)
    return d


def _deci():
    return ModelShape(**{**TINY.to_dict(), "layers": [LayerShape(6, 2, 128), LayerShape(3, 1, 64),
                                                      LayerShape(6, 2, 32)]})


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
@pytest.mark.parametrize("uniform", [True, False])
def test_predicted_gguf_size_and_memory_check(tok_dir, tmp_path, dtype, uniform):
    """The predicted file size is the exported file's; the predicted memory check is the profiler's own."""
    pytest.importorskip("llama_cpp")
    from edgeprune.devices import profiler

    from edgeprune.fit.shapes import tokenizer_bytes
    from edgeprune.fit.synthetic import build_artifact

    shape = TINY if uniform else _deci()
    shape.tokenizer_bytes = tokenizer_bytes(tok_dir)
    art = build_artifact(shape, tok_dir, "gguf", dtype, tmp_path / "a")
    actual = (art / "model.gguf").stat().st_size
    assert abs(file_bytes(shape, "gguf", dtype) - actual) < 0.02 * actual + 4096
    assert from_checkpoint(art).layers == shape.layers  # the artifact's config.json describes the same shape
    check = profiler.memory_check_for(art, SETTINGS["prompt_lengths"], SETTINGS["new_tokens"], None, None)
    pred = predict_memory(shape, "gguf", dtype, SETTINGS)
    assert pred["n_ctx"] == check["n_ctx"] and pred["parts_mb"]["kv_cache"] == check["parts_mb"]["kv_cache"]
    assert pred["estimate_mb"] == pytest.approx(check["estimate_mb"], rel=0.01)


def test_at_ratio_removes_the_budget():
    base = ModelShape(hidden=576, head_dim=64, vocab=49152, context=8192, layers=[LayerShape(9, 3, 1536)] * 30)
    for r in (0.1, 0.2, 0.4):
        s = at_ratio(base, r, 32)
        removed = 1 - s.params()["decoder_layers"] / base.params()["decoder_layers"]
        assert abs(removed - r) < 0.02
        assert all(L.kv_heads >= 1 and L.heads == 3 * L.kv_heads and L.ffn % 32 == 0 for L in s.layers)
    assert at_ratio(base, 0.0).layers == base.layers
    with pytest.raises(EdgePruneError):
        at_ratio(base, 1.2)


# ---- latency model --------------------------------------------------------------------------------------------
def _table(law, shapes, fmt="gguf", dtype="q8_0"):
    rows = []
    for i, (name, s, held) in enumerate(shapes):
        ms = law(s)
        rows.append({"name": name, "held_out": held, "shape": s.to_dict(), "decode_ms": ms,
                     "decode_tok_s": 1000 / ms, "ttft_ms": {"8": 5 + 0.1 * i, "16": 9 + 0.2 * i}})
    return {"format": fmt, "dtype": dtype, "rows": rows}


def test_latency_model_recovers_a_linear_law():
    """Probe shapes timed by a known bytes law: the fit recovers it and predicts held-out shapes."""
    from edgeprune.fit.shapes import part_bytes
    from edgeprune.fit.synthetic import probe_shapes

    base = ModelShape(hidden=576, head_dim=64, vocab=49152, context=8192, layers=[LayerShape(9, 3, 1536)] * 12)

    def law(s):
        p = part_bytes(s, "gguf", "q8_0")
        return 3.0 + 0.05 * len(s.layers) + 0.02 * sum(p["attention"]) / 1e6 + 0.01 * sum(p["mlp"]) / 1e6

    probes = probe_shapes(base)
    assert sum(h for _, _, h in probes) >= 2 and len({n for n, _, _ in probes}) == len(probes)
    model = latency.LatencyModel.fit(_table(law, probes))
    assert model.decode == pytest.approx([3.0, 0.05, 0.02, 0.01], rel=1e-6, abs=1e-9)
    assert model.errors["held_out"]["decode_tok_s"]["max_abs"] < 1e-6
    group, channel = model.unit_ms(base)
    assert group[0] > 0 and channel[0] > 0 and group[0] / channel[0] > 50  # a KV group is many channels' bytes


def test_latency_fit_is_non_negative():
    x = np.array([[1, 1.0], [1, 2.0], [1, 3.0]])
    y = np.array([3.0, 2.0, 1.0])  # a negative slope is not a cost
    assert (latency._nnls(x, y) >= 0).all()


# ---- search on synthetic predictions --------------------------------------------------------------------------
class _Speed:
    """A stand-in latency model: decode time proportional to the weight bytes (q4_k_m faster per byte)."""

    def __init__(self, fmt, dtype, k=1.2e10):
        self.fmt, self.dtype, self.k = fmt, dtype, k

    def decode_tok_s(self, shape):
        return self.k / file_bytes(shape, self.fmt, self.dtype)

    def ttft_ms(self, shape, prompt):
        return prompt * file_bytes(shape, self.fmt, self.dtype) / 1e7


BASE = ModelShape(hidden=576, head_dim=64, vocab=49152, context=8192, layers=[LayerShape(9, 3, 1536)] * 30)
MODELS = {"q8_0": _Speed("gguf", "q8_0"), "q4_k_m": _Speed("gguf", "q4_k_m")}


def _cands(targets, dtypes=("q8_0",)):
    return search.candidates(BASE, "gguf", dtypes, MODELS, {**SETTINGS, "prompt_lengths": [32, 128, 512],
                                                            "new_tokens": 64}, targets)


def test_search_picks_the_least_compression_that_meets_the_targets():
    dense = _cands(search.Targets())[0].predicted["decode_tok_s"]
    t = search.Targets(min_decode_tok_s=1.2 * dense)
    c = search.choose(_cands(t), t)
    assert c.ratio > 0 and c.predicted["decode_tok_s"] >= 1.2 * dense
    assert search.RATIOS[1] == 0.01  # the grid's step
    smaller = search.predict(BASE, round(c.ratio - 0.01, 2), "gguf", "q8_0", MODELS, {**SETTINGS,
                             "prompt_lengths": [512], "new_tokens": 64}, t)
    assert smaller.predicted["decode_tok_s"] < 1.2 * dense  # the next smaller ratio would miss
    # with q4_k_m allowed, the unpruned q4_k_m model is predicted faster and better than pruning q8_0 by 20%+
    both = search.choose(_cands(t, ("q8_0", "q4_k_m")), t)
    assert (both.dtype, both.ratio) == ("q4_k_m", 0.0)
    # stepping after a miss goes to a more compressed configuration
    nxt = search.choose(_cands(t), t, after=c)
    assert nxt.ratio > c.ratio


def test_step_after_a_miss_leaves_the_missed_configuration():
    """A measured miss scales the search's predictions so that the missed configuration is predicted at what was
    measured: the step goes to more compression, never to the same configuration predicted a little slower."""
    from edgeprune.fit import run

    dense = _cands(search.Targets())[0].predicted["decode_tok_s"]
    t = search.Targets(min_decode_tok_s=1.2 * dense)
    c = search.choose(_cands(t), t)
    # measured just under the target; the pruned model's own shapes predicted slower than the search's
    attempt = {"predicted": c.predicted, "predicted_from_shapes": {**c.predicted, "decode_tok_s":
                                                                   0.995 * c.predicted["decode_tok_s"]},
               "measured": {"decode_tok_s": 0.99 * t.min_decode_tok_s}}
    k = run.corrections(attempt)["decode"]
    assert k == pytest.approx(0.99 * t.min_decode_tok_s / c.predicted["decode_tok_s"])
    again = search.candidates(BASE, "gguf", ("q8_0",), MODELS, {**SETTINGS, "prompt_lengths": [32, 128, 512],
                                                                "new_tokens": 64}, t, scale={"decode:q8_0": k})
    same = next(x for x in again if (x.ratio, x.dtype) == (c.ratio, c.dtype))
    assert same.predicted["decode_tok_s"] == pytest.approx(0.99 * t.min_decode_tok_s, rel=1e-3)
    nxt = search.choose(again, t, after=c)
    assert nxt.ratio > c.ratio and nxt.predicted["decode_tok_s"] >= t.min_decode_tok_s
    # even a candidate list that still predicts the missed configuration to meet never returns it
    slower = [search.Candidate(x.ratio, x.fmt, x.dtype, {**x.predicted, "decode_tok_s": x.predicted["decode_tok_s"]
                                                         - 1e-3}) for x in _cands(t)]
    pick = search.choose(slower, t, after=c)
    assert (pick.ratio, pick.dtype) != (c.ratio, c.dtype)


def test_search_quality_and_memory_targets():
    t = search.Targets(max_ppl_ratio=1.2, max_memory_mb=10_000)
    c = search.choose(_cands(t, ("q8_0", "q4_k_m")), t)
    assert (c.ratio, c.dtype) == (0.0, "q8_0")
    dense = _cands(search.Targets())[0].predicted
    t = search.Targets(max_memory_mb=0.9 * dense["memory_mb"])  # predicted peak RSS
    c = search.choose(_cands(t), t)
    assert c.predicted["memory_mb"] <= 0.9 * dense["memory_mb"] and c.ratio > 0
    t = search.Targets(budget_mb=dense["memory_mb"])  # the profiler's check (with its margin) must pass
    c = search.choose(_cands(t), t)
    assert c.predicted["memory_check_mb"] <= dense["memory_mb"] < c.predicted["memory_check_mb"] * 1.2


def test_search_unreachable_names_the_target_and_best_value():
    t = search.Targets(min_decode_tok_s=1e6)
    with pytest.raises(search.Unreachable) as e:
        search.choose(_cands(t), t, "cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--min-decode-tok-s 1e+06 is out of reach on device 'cpu'")
    fastest = max(c.predicted["decode_tok_s"] for c in _cands(t))
    assert f"{fastest:g} tok/s" in msg and "ratio 0.70" in msg
    # each reachable alone, not together: the message says which one the others leave out of reach
    t = search.Targets(max_ppl_ratio=1.05, max_size_mb=100)
    with pytest.raises(search.Unreachable) as e:
        search.choose(_cands(t), t)
    assert "while meeting the other targets" in str(e.value)
    with pytest.raises(EdgePruneError, match="--prompt-tokens"):
        search.Targets(max_ttft_ms=100).validate()


# ---- LSPS latency budget --------------------------------------------------------------------------------------
def test_lsps_latency_budget_cuts_where_time_goes():
    from edgeprune.allocation.layerwise import allocate_lsps
    from edgeprune.models.tiny import build_tiny
    from edgeprune.sensitivity import LayerSensitivity

    lm = build_tiny("llama")
    sens = [LayerSensitivity(i, 1.0, 1.0) for i in range(3)]
    params = allocate_lsps(lm.adapter, 0.3, sens)
    # attention nearly free, MLP channels expensive: a 30 % time budget comes from the MLP
    cost = [[1e-6, 1.0]] * 3
    timed = allocate_lsps(lm.adapter, 0.3, sens, unit_cost=cost)
    assert sum(x.channels for x in timed.layers) > sum(x.channels for x in params.layers)
    assert sum(x.attn_units for x in timed.layers) <= sum(x.attn_units for x in params.layers)
    spent = sum(x.channels for x in timed.layers) * 1.0
    assert spent == pytest.approx(0.3 * 3 * 128, abs=2)
    with pytest.raises(EdgePruneError):
        allocate_lsps(lm.adapter, 0.3, sens, attn_unit="head", unit_cost=cost)


# ---- the command ------------------------------------------------------------------------------------------------
def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_fit_unreachable_is_one_line_exit_2(tmp_path):
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models.tiny import build_tiny

    ck = tmp_path / "tiny"
    save_checkpoint(build_tiny("llama"), ck, {})
    p = _cli("fit", str(ck), "--device", "cpu", "--max-size-mb", "0.01", "--out", str(tmp_path / "fit"))
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--max-size-mb 0.01 is out of reach on device 'cpu'" in lines[0]
    assert "the smallest configuration (ratio 0." in lines[0] and "gguf q4_k_m) is predicted at" in lines[0]
    assert "Traceback" not in p.stderr
    p = _cli("fit", str(ck), "--dtypes", "int8", "--out", str(tmp_path / "fit"))
    assert p.returncode == 2 and "gguf takes dtypes" in p.stderr
    p = _cli("fit", str(ck), "--set", "nonsense=1", "--out", str(tmp_path / "fit"))
    assert p.returncode == 2 and "unknown prune setting" in p.stderr


@pytest.mark.slow
def test_fit_end_to_end_default_model(tmp_path):
    """A loose size and memory target on the default model, q8_0 only (with q4_k_m allowed, the unpruned q4_k_m
    file would meet it): prune (a shortened recipe), export, PPL, profile; predicted vs measured reported for
    every target, and the predictions of size and memory are close."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "fit"
    p = _cli("fit", "default", "--device", "cpu", "--max-size-mb", "130", "--max-memory-mb", "2000", "--dtypes", "q8_0",
             "--threads", "1", "--set", "recover_steps=0", "--set", "rounds=1", "--set", "reconstruct=false",
             "--set", "n_samples=8", "--max-tokens", "1024", "--out", str(out), "--json", str(tmp_path / "f.json"),
             timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((tmp_path / "f.json").read_text())
    a = r["final"]
    # dense q8_0 is 141 MiB: the least pruning that fits 130 MiB is 10-15 %
    assert r["met"] and 0.05 <= a["ratio"] <= 0.15 and a["dtype"] == "q8_0"
    assert a["measured"]["size_mb"] <= 130 and a["measured"]["size_mb"] == pytest.approx(
        a["predicted_from_shapes"]["size_mb"], rel=0.01)
    assert a["measured"]["memory_mb"] == pytest.approx(a["predicted_from_shapes"]["memory_mb"], rel=0.1)
    assert math.isfinite(a["measured"]["ppl"]) and a["measured"]["ppl_ratio"] > 1
    assert "size (MiB)" in p.stdout and "predicted" in p.stdout and "measured" in p.stdout


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_predicted_onnx_size_and_memory_check(tok_dir, tmp_path, dtype):
    """ONNX: the predicted file size (one table for the tied embedding and head) is the exported file's, and the
    predicted memory check is the profiler's own on that file."""
    from edgeprune.devices import profiler

    from edgeprune.fit.synthetic import build_artifact

    shape = _deci()
    art = build_artifact(shape, tok_dir, "onnx", dtype, tmp_path / "a")
    actual = sum(f.stat().st_size for f in art.glob("model.onnx*"))
    # within 5 %: a second float table would be 13 % of this file (the graph's nodes are the rest of the error)
    assert abs(file_bytes(shape, "onnx", dtype) - actual) < 0.05 * actual
    check = profiler.memory_check_for(art, SETTINGS["prompt_lengths"], SETTINGS["new_tokens"], None, None)
    pred = predict_memory(shape, "onnx", dtype, SETTINGS)
    assert pred["estimate_mb"] == pytest.approx(check["estimate_mb"], rel=0.02)
