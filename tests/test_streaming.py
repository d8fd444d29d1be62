"""Streamed passes (edgeprune/streaming.py, edgeprune/stream_prune.py) against the in-memory ones on tiny models
saved as safetensors: the same statistics, scores, plans and pruned weights, with layers on ``meta`` between uses."""

import pytest
import torch

from edgeprune.errors import EdgePruneError


@pytest.fixture(scope="module")
def calib():
    from edgeprune.data import load_text

    return load_text("builtin", "calib")


def _saved(tmp_path, family="llama", shard="60KB"):
    """A tiny model written as several safetensors shards (a layer's tensors may span two files)."""
    from edgeprune.models.tiny import build_tiny

    lm = build_tiny(family)
    lm.model.save_pretrained(tmp_path / "src", max_shard_size=shard)
    lm.tokenizer.save_pretrained(tmp_path / "src")
    return lm, tmp_path / "src"


def test_streaming_bounds_the_heap(tmp_path, monkeypatch):
    """A StreamedModel fixes glibc's malloc thresholds (the mechanism: tests/test_heap.py)."""
    import edgeprune.streaming as streaming

    _, src = _saved(tmp_path)
    calls = []
    monkeypatch.setattr(streaming, "bound_heap", lambda: calls.append(1))
    streaming.StreamedModel(src)
    assert calls == [1]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_scores_equal_in_memory(tmp_path, calib, family):
    from edgeprune.data import calibration_batches
    from edgeprune.scoring import make_scorer, score_model
    from edgeprune.stream_prune import stream_score
    from edgeprune.streaming import StreamedModel

    lm, src = _saved(tmp_path, family)
    assert (src / "model.safetensors.index.json").is_file()
    sm = StreamedModel(src)
    assert all(p.device.type == "meta" for layer in sm.adapter.layers for p in layer.layer.parameters())
    batches = calibration_batches(lm.tokenizer, calib, 8, 32, 0)
    for name, opts in (("wanda-sp", {}), ("fluctuation", {}), ("magnitude", {}), ("piem", {"beta": 0.0})):
        ref = score_model(lm.adapter, make_scorer(name, **opts), batches, progress=False, block_stats=True)
        got = stream_score(sm, make_scorer(name, **opts), batches, block_stats=True, progress=False)
        for a, b in zip(ref.layers, got.layers, strict=True):
            for kind in ("groups", "heads", "channels"):
                torch.testing.assert_close(getattr(b, kind), getattr(a, kind), rtol=1e-12, atol=0)
            assert b.blocks == pytest.approx(a.blocks, rel=1e-12)
    # the layers went back to meta after the passes
    assert all(p.device.type == "meta" for layer in sm.adapter.layers for p in layer.layer.parameters())


def test_streamed_piem_with_the_lens_term(tmp_path, calib):
    """The default streamed PIEM: the gradient term comes from the logit lens (and changes the scores), the
    layers go back to meta, the lens pass leaves no gradient on any weight."""
    from edgeprune.data import calibration_batches
    from edgeprune.scoring import make_scorer
    from edgeprune.stream_prune import stream_score
    from edgeprune.streaming import StreamedModel

    lm, src = _saved(tmp_path)
    sm = StreamedModel(src)
    batches = calibration_batches(lm.tokenizer, calib, 8, 32, 0)
    lens = stream_score(sm, make_scorer("piem"), batches, micro_batch=4, progress=False)
    none = stream_score(sm, make_scorer("piem"), batches, micro_batch=4, gradient="none", progress=False)
    assert lens.meta["gradient"] == "lens" and lens.meta["scorer"]["beta"] > 0 == none.meta["scorer"]["beta"]
    for a, b in zip(lens.layers, none.layers, strict=True):
        assert torch.isfinite(a.channels).all() and not torch.allclose(a.channels, b.channels)
    assert all(p.grad is None and not p.requires_grad for p in sm.model.parameters())
    assert all(p.device.type == "meta" for layer in sm.adapter.layers for p in layer.layer.parameters())


def test_lens_gradient_is_exact_for_the_last_layer(tmp_path, calib):
    """The layer-local logit-lens loss of the last layer is the model's loss: its gradient is the true one."""
    from edgeprune.data import calibration_batches
    from edgeprune.scoring.calibration import accumulate_gradients, capture_layer0_inputs, collect_layer_stats
    from edgeprune.stream_prune import lens_gradients
    from edgeprune.streaming import StreamedModel

    lm, src = _saved(tmp_path)
    batches = calibration_batches(lm.tokenizer, calib, 8, 32, 0)
    exact = accumulate_gradients(lm.adapter, batches, micro_batch=4, progress=False)
    sm = StreamedModel(src)
    inputs = capture_layer0_inputs(sm.adapter, batches, 4)
    last = len(sm.adapter.layers) - 1
    got = {}
    for i in range(last + 1):
        with sm.layer(i) as layer:
            if i in (0, last):
                got[i] = lens_gradients(sm.adapter, layer, inputs, batches, 4, stride=1)
            _, inputs = collect_layer_stats(layer, inputs)
    first, lens = got[0], got[last]
    for k, g in lens.items():
        torch.testing.assert_close(g, exact[k], rtol=1e-4, atol=1e-7)
    # an earlier layer's lens gradient is a surrogate, not the true gradient
    assert not torch.allclose(first["0.down"], exact["0.down"], rtol=1e-2)


@pytest.mark.parametrize("options", [
    {},
    {"reconstruct": True, "rounds": 2},
    {"bias_compensation": True, "allocator": "uniform", "attn_unit": "head"},
])
def test_streamed_prune_matches_in_memory(tmp_path, calib, options):
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.models import load
    from edgeprune.prune import PruneConfig, prune_model
    from edgeprune.stream_prune import stream_prune

    lm, src = _saved(tmp_path, "qwen2")
    opts = {"allocator": "lsps", "sensitivity": "bi", **options}
    cfg = PruneConfig(ratio=0.3, n_samples=8, seq_len=32, scorer_options={"beta": 0.0}, **opts)
    ref = prune_model(lm, cfg, calib, progress=False)
    save_checkpoint(lm, tmp_path / "mem", {})
    got = stream_prune(str(src), cfg, calib, tmp_path / "str", progress=False)
    assert got["plan"]["layers"] == ref["plan"]["layers"]
    assert got["layer_shapes"] == ref["layer_shapes"]
    assert got["params_after"] == ref["params_after"]
    mem, streamed = load(str(tmp_path / "mem")), load(str(tmp_path / "str"))
    assert streamed.manifest["kind"] == "pruned-checkpoint"
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(streamed.model(ids).logits, mem.model(ids).logits, rtol=0, atol=1e-5)


def test_streamed_bf16_and_dropped_layers(tmp_path, calib):
    """A plan that drops a layer renumbers the shards; bf16 weights are written as bf16."""
    import json

    from edgeprune.models import load
    from edgeprune.plan import PruningPlan
    from edgeprune.stream_prune import stream_apply
    from edgeprune.streaming import StreamedModel
    from edgeprune.surgery import apply_plan

    lm, src = _saved(tmp_path)
    plan = PruningPlan.identity(lm.adapter)
    plan.layers[1].drop = True
    plan.layers[2].channels = plan.layers[2].channels[::2]
    sm = StreamedModel(src, dtype="bfloat16")
    (tmp_path / "out").mkdir()
    stream_apply(sm, plan, tmp_path / "out", progress=False)
    sm.tokenizer().save_pretrained(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(".layers.2." in k for k in index) and any(".layers.1." in k for k in index)
    got = load(str(tmp_path / "out"))
    apply_plan(lm.adapter, plan)
    ref = lm.model.to(torch.bfloat16)
    assert got.model.config.num_hidden_layers == 2
    for (n, a), (_, b) in zip(ref.named_parameters(), got.model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a.float(), rtol=0, atol=0, msg=n)


def test_stream_errors(tmp_path, calib):
    from edgeprune.prune import PruneConfig
    from edgeprune.stream_prune import stream_prune
    from edgeprune.streaming import StreamedModel, source_dir

    _, src = _saved(tmp_path)
    with pytest.raises(EdgePruneError, match="bi sensitivity"):
        stream_prune(str(src), PruneConfig(ratio=0.2, allocator="lsps", sensitivity="loss"), calib, tmp_path / "o")
    with pytest.raises(EdgePruneError, match="distill"):
        stream_prune(str(src), PruneConfig(ratio=0.2, recover_steps=5), calib, tmp_path / "o")
    with pytest.raises(EdgePruneError, match="all gradient"):
        stream_prune(str(src), PruneConfig(ratio=0.2, scorer="taylor", n_samples=4, seq_len=16), calib,
                     tmp_path / "o", gradient="none")
    with pytest.raises(EdgePruneError, match="prune_checkpoint"):
        from edgeprune.prune import prune_model

        prune_model(None, PruneConfig(stream=True), calib)
    with pytest.raises(EdgePruneError, match="local model directory"):
        source_dir(str(tmp_path / "nope"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(EdgePruneError, match="no safetensors"):
        StreamedModel(tmp_path / "bin")
    assert not (tmp_path / "o").exists()


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edgeprune", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


CLI_RECIPE = ("--ratio", "0.3", "--n-samples", "8", "--calib-seq-len", "32", "--calib", "builtin", "--rounds", "2",
              "--piem-weights", "0.1,0,0.8")  # no gradient term: the streamed scores are the in-memory ones


def test_cli_stream_writes_the_checkpoint_prune_writes(tmp_path):
    """`edgeprune prune --stream` writes the files and manifest of `edgeprune prune`, with the same plan and
    logits; `--dtype bfloat16` streams and saves in bfloat16."""
    import json

    from safetensors import safe_open

    from edgeprune.models import load

    _, src = _saved(tmp_path, "qwen2")
    for name, extra in (("mem", ()), ("str", ("--stream",)), ("bf16", ("--stream", "--dtype", "bfloat16"))):
        p = _cli("prune", src, *CLI_RECIPE, *extra, "-o", tmp_path / name, "--json", tmp_path / f"{name}.json")
        assert p.returncode == 0, p.stderr
    mem, got = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("mem", "str"))
    assert got["kind"] == mem["kind"] == "pruned-checkpoint"
    assert got["plan"]["layers"] == mem["plan"]["layers"] and got["layout"] == mem["layout"]
    assert got["config"]["stream"] and not mem["config"]["stream"]
    assert {k for k in mem if k not in ("created", "command")} == {k for k in got if k not in ("created", "command")}
    assert got["plan"]["meta"]["streamed"] == {"dtype": "float32", "gradient": "lens"}
    assert json.loads((tmp_path / "str.json").read_text())["source_model"] == str(src)
    same = {"config.json", "generation_config.json", "manifest.json", "tokenizer.json", "tokenizer_config.json",
            "modeling_edgeprune.py"}
    names = {n: {p.name for p in (tmp_path / n).iterdir()} for n in ("mem", "str")}
    assert same & names["mem"] <= names["str"]  # weights: one file vs per-layer shards with an index
    assert "model.safetensors.index.json" in names["str"]
    a, b = load(str(tmp_path / "mem")), load(str(tmp_path / "str"))
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b.model(ids).logits, a.model(ids).logits, rtol=0, atol=1e-5)
    bf16 = tmp_path / "bf16"
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    shard = next(bf16.glob("model-00001-*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118


@pytest.mark.parametrize("args,needle", [
    (("--sensitivity", "loss"), "use --sensitivity bi"),
    (("--recover-steps", "5"), "use --recover-steps 0"),
    (("--scorer", "taylor", "--stream-gradient", "none"), "--stream-gradient lens"),
    (("--device", "cuda"), "use --device cpu"),
    (("--stream-gradient", "exact"), "unknown stream-gradient 'exact'"),
])
def test_cli_stream_errors_are_one_line(tmp_path, args, needle):
    _, src = _saved(tmp_path)
    p = _cli("prune", src, "--stream", *args, "-o", tmp_path / "o")
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "o").exists()


def test_run_config_stream_keys(tmp_path, calib):
    """[prune] stream / stream_gradient: config keys (and --set), in the prune stage's key only when streaming,
    and the stage streams: the same result fields as the in-memory stage."""
    from dataclasses import replace

    from edgeprune.config import ModelLoad
    from edgeprune.pipeline import load_config
    from edgeprune.pipeline.stages import Context, PruneStage

    path = tmp_path / "c.toml"
    path.write_text('[prune]\nstream = true\nstream_gradient = "none"\n')
    cfg = load_config(path)
    assert (cfg.prune.stream, cfg.prune.stream_gradient) == (True, "none")
    assert load_config(None, ["prune.stream=true"]).prune.stream
    with pytest.raises(EdgePruneError, match="unknown stream-gradient"):
        load_config(None, ["prune.stream_gradient='exact'"]).prune.validate()
    lm, src = _saved(tmp_path, "qwen2")
    ctx = Context(tmp_path / "run", None, False)
    pcfg = replace(cfg.prune, ratio=0.3, n_samples=8, seq_len=32, rounds=1, piem_weights=[0.1, 0.0, 0.8])

    def stage(**kw):
        return PruneStage(ctx, str(src), "fp", replace(pcfg, **kw), calib, ModelLoad())

    keys = {k: stage(**kw).inputs() for k, kw in {"mem": {"stream": False}, "mem_lens": {
        "stream": False, "stream_gradient": "lens"}, "none": {}, "lens": {"stream_gradient": "lens"}}.items()}
    assert keys["mem"] == keys["mem_lens"] and "stream" not in keys["mem"]  # older run directories keep their keys
    assert keys["none"]["stream"] == {"gradient": "none"} and keys["lens"]["stream"] == {"gradient": "lens"}
    assert keys["none"]["prune"] == keys["mem"]["prune"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    got, ref = stage().run(tmp_path / "a"), stage(stream=False).run(tmp_path / "b")
    assert (tmp_path / "a" / "model" / "model.safetensors.index.json").is_file()
    for k in ("shapes_before", "layer_params_before", "layer_params_after", "layer_shapes", "params_after",
              "checkpoint"):
        assert got[k] == ref[k], k
    assert got["plan"]["layers"] == ref["plan"]["layers"]
