import math

import pytest
import torch

from edgeprune.data import Text
from edgeprune.errors import EdgePruneError
from edgeprune.evaluate.ppl import perplexity
from edgeprune.models.tiny import build_tiny

TEXT = Text("The quick brown fox jumps over the lazy dog. " * 40, "fox")


def test_ppl_matches_direct_computation_and_is_batch_invariant():
    lm = build_tiny("llama")
    r1 = perplexity(lm.model, lm.tokenizer, TEXT, seq_len=64, batch_size=1, progress=False)
    r4 = perplexity(lm.model, lm.tokenizer, TEXT, seq_len=64, batch_size=4, progress=False)
    ids = torch.tensor(lm.tokenizer(TEXT.text, add_special_tokens=False).input_ids)
    n = ids.numel() // 64
    windows = ids[: n * 64].view(n, 64)
    with torch.no_grad():
        nll = torch.stack([lm.model(w[None], labels=w[None]).loss for w in windows]).mean()
    assert r1["windows"] == n == r4["windows"]
    assert r1["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert r4["ppl"] == pytest.approx(r1["ppl"], rel=1e-5)


def test_max_tokens_limits_windows():
    lm = build_tiny("llama")
    r = perplexity(lm.model, lm.tokenizer, TEXT, seq_len=32, max_tokens=100, progress=False)
    assert r["windows"] == 3 and r["tokens_scored"] == 96


def test_text_shorter_than_a_window_is_an_error():
    lm = build_tiny("llama")
    with pytest.raises(EdgePruneError, match="fewer than one window"):
        perplexity(lm.model, lm.tokenizer, Text("short", "s"), seq_len=128, progress=False)


@pytest.mark.slow
def test_default_model_wikitext_slice(default_lm, data_dir):
    from edgeprune.data import load_text

    text = load_text(str(data_dir / "wikitext-2" / "wiki.test.raw"))
    r = perplexity(default_lm.model, default_lm.tokenizer, text, 128, max_tokens=4096, progress=False)
    assert r["tokens_in_text"] > 300_000  # the whole test set, tokenized
    assert 30 < r["ppl"] < 90  # a trained 135M model; a broken load gives thousands
