import pytest

from edgeprune.data import calibration_batches, load_text, wikitext_join
from edgeprune.errors import EdgePruneError
from edgeprune.models.tiny import byte_tokenizer


def test_builtin_splits_are_disjoint_and_nonempty():
    calib, ev = load_text("builtin", "calib"), load_text("builtin", "eval")
    assert len(calib.text) > 100_000 and len(ev.text) > 20_000
    calib_paras = set(calib.text.split("\n\n"))
    overlap = [p for p in ev.text.split("\n\n") if len(p) > 200 and p in calib_paras]
    assert not overlap


def test_wikitext_join_matches_hf_rows():
    lines = [" ", " = Title = ", " ", " Some text . "]
    assert wikitext_join(lines) == "\n\n = Title = \n" + "\n\n" + "" + "\n\n" + " Some text . \n"


def test_wikitext_file_uses_standard_join(data_dir):
    t = load_text(str(data_dir / "wikitext-2" / "wiki.test.raw"))
    assert t.text.startswith("\n\n = Robert Boulter = \n")


def test_calibration_is_seeded_and_checks_length(tmp_path):
    tok = byte_tokenizer()
    text = load_text("builtin", "calib")
    a = calibration_batches(tok, text, 4, 32, seed=1)
    b = calibration_batches(tok, text, 4, 32, seed=1)
    c = calibration_batches(tok, text, 4, 32, seed=2)
    assert a.shape == (4, 32) and (a == b).all() and not (a == c).all()
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(EdgePruneError, match="fewer than"):
        calibration_batches(tok, load_text(str(short)), 4, 32)


def test_missing_text_is_a_clear_error():
    with pytest.raises(EdgePruneError, match="not found"):
        load_text("/no/such/file.txt")
