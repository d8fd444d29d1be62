import json
import subprocess
import sys

import pytest


def run(*args, check_rc=None):
    p = subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True, timeout=600)
    if check_rc is not None:
        assert p.returncode == check_rc, p.stderr
    return p


def _one_line_error(p):
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr
    return lines[-1]


@pytest.mark.parametrize("args,needle", [
    (["info", "/no/such/model"], "not found"),
    (["eval", "/no/such/model"], "not found"),
    (["eval", "default", "--data", "/no/such/text.txt"], "not found"),
    (["eval", "default", "--tasks", "nope"], "unknown task"),
    (["prune", "default", "--ratio", "1.5"], "--ratio must be in [0, 1)"),
    (["prune", "default", "--scorer", "nope"], "unknown scorer"),
    (["prune", "default", "--rounds", "0"], "rounds, round-to"),
    (["prune", "default", "--recover-steps", "10", "--recover-lr", "0"], "learning rate"),
    (["prune", "default", "--min-module-ratio", "0.5", "--max-module-ratio", "0.4"], "min-module-ratio"),
    (["score", "default", "--scorer", "nope"], "unknown scorer"),
])
def test_bad_input_gives_one_line_error(args, needle):
    assert needle in _one_line_error(run(*args))


def test_unknown_architecture_cli(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "unsupported architecture" in _one_line_error(run("info", str(tmp_path)))


@pytest.mark.slow
def test_text_too_short_for_seq_len(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a few words only")
    assert "fewer than one window" in _one_line_error(run("eval", "default", "--data", str(f)))
    msg = _one_line_error(run("prune", "default", "--calib", str(f), "-o", str(tmp_path / "o")))
    assert "fewer than" in msg and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_info_and_eval_default_json(tmp_path, data_dir):
    p = run("info", "default", "--json", str(tmp_path / "info.json"), check_rc=0)
    assert "134.5M" in p.stdout
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["num_layers"] == 30
    run("eval", "default", "--data", str(data_dir / "wikitext-2" / "wiki.test.raw"), "--max-tokens", "1024",
        "--tasks", "arc_easy,boolq", "--tasks-dir", str(data_dir), "--limit", "8",
        "--json", str(tmp_path / "e.json"), check_rc=0)
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["ppl"]["windows"] == 8 and e["zeroshot"]["tasks"]["boolq"]["n"] == 8
