"""The report reads every number from the run directory, and its HTML page renders in headless Chromium with its
plots. The run directory here is written by hand (distinctive numbers, no model), so that each number in the
report can be traced to the stage file it came from."""

import base64
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from edgeprune.errors import EdgePruneError
from edgeprune.report import regenerate, write_report
from edgeprune.report_data import collect
from edgeprune.report_readme import README_END, README_START, update_readme

N_LAYERS = 4


def _stage(run: Path, name: str, result: dict) -> dict:
    d = run / ("report" if name == "report" else f"stages/{name}")
    d.mkdir(parents=True, exist_ok=True)
    key = f"key-{name}"
    (d / "stage.json").write_text(json.dumps({"kind": "pipeline-stage", "name": name, "key": key,
                                              "seconds": 1.5, "result": result}))
    return {"name": name, "status": "computed", "key": key, "seconds": 1.5,
            "directory": str(d.relative_to(run))}


def _prune_result() -> dict:
    before = [{"num_heads": 9, "num_kv_heads": 3, "intermediate_size": 1536}] * N_LAYERS
    plan = [{"index": i, "heads": list(range(9 - 3 * (i % 2))), "kv_heads": list(range(3 - (i % 2))),
             "channels": list(range(1536 - 100 * i)), "drop": False} for i in range(N_LAYERS)]
    pb = [{"attention": 1000, "mlp": 3000, "norms": 10, "total": 4010}] * N_LAYERS
    pa = [{"attention": 1000 - 333 * (i % 2), "mlp": 3000 - 200 * i, "norms": 10,
           "total": 4010 - 333 * (i % 2) - 200 * i} for i in range(N_LAYERS)]
    return {
        "config": {"ratio": 0.2, "scorer": "piem", "allocator": "lsps", "sensitivity": "loss"},
        "calibration": {"text": "builtin:calib"},
        "plan": {"meta": {}, "layers": plan},
        "shapes_before": before, "layer_params_before": pb, "layer_params_after": pa,
        "rounds": [{"round": 1, "allocation": {"layers": [{"index": i, "ratio": 0.1 + 0.05 * i}
                                                          for i in range(N_LAYERS)]},
                    "sensitivity": [{"index": i, "attention": 0.9 - 0.1 * i, "mlp": 0.8 - 0.1 * i}
                                    for i in range(N_LAYERS)],
                    "block_influence": [{"layer": 0.3, "attention": 0.2, "mlp": 0.1}] * N_LAYERS}],
        "params_before": {"embeddings": 28311552, "lm_head": 0, "attention": 1000, "mlp": 3000, "norms": 40,
                          "decoder_layers": 4040, "total": 134515008},
        "params_after": {"embeddings": 28311552, "lm_head": 0, "attention": 800, "mlp": 2400, "norms": 40,
                         "decoder_layers": 3240, "total": 111222333},
        "decoder_reduction": 0.2, "total_reduction": 0.173, "seconds": 61.0,
    }


def _eval_result(params: int, ppl: float, acc: float) -> dict:
    return {"params": {"total": params, "decoder_layers": params - 28311552},
            "ppl": {"ppl": ppl, "text": "wiki.test.raw", "seq_len": 128, "tokens_scored": 8192},
            "zeroshot": {"tasks": {"piqa": {"acc": acc, "acc_norm": acc, "n": 50},
                                   "boolq": {"acc": acc - 0.01, "acc_norm": acc, "n": 50}},
                         "average": {"acc": acc - 0.005, "acc_norm": acc}, "limit": 50}}


# distinctive numbers: each must appear in the report exactly as the stage files say
NUMBERS = {
    ("baseline", "gguf", "q8_0"): dict(size=145_000_000, ppl=31.4159, ttft=123.45, tps=67.89, rss=234.5),
    ("pruned", "gguf", "q8_0"): dict(size=120_000_000, ppl=37.1828, ttft=98.76, tps=81.23, rss=201.7),
    ("baseline", "onnx", "int8"): dict(size=190_000_000, ppl=31.9999, ttft=222.22, tps=44.44, rss=555.5),
    ("pruned", "onnx", "int8"): dict(size=150_000_000, ppl=38.8888, ttft=177.77, tps=55.55, rss=444.4),
}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    stages = [_stage(run, "eval-baseline", _eval_result(134515008, 16.0123, 0.6543)),
              _stage(run, "prune", _prune_result()),
              _stage(run, "eval-pruned", _eval_result(111222333, 19.8765, 0.6012))]
    for (v, fmt, dtype), n in NUMBERS.items():
        stages.append(_stage(run, f"export-{v}-{fmt}-{dtype}", {
            "variant": v, "format": fmt, "dtype": dtype, "size_bytes": n["size"], "parity": {"passed": True}}))
        stages.append(_stage(run, f"ppl-{v}-{fmt}-{dtype}", {"ppl": n["ppl"]}))
        stages.append(_stage(run, f"profile-{v}-{fmt}-{dtype}", {
            "device": "cpu", "ttft_ms": n["ttft"], "decode_tokens_per_s": n["tps"], "peak_rss_mib": n["rss"]}))
    # a stale stage of an earlier config: not in the manifest, so not in the report
    _stage(run, "export-pruned-gguf-q4_k_m", {"variant": "pruned", "format": "gguf", "dtype": "q4_k_m",
                                              "size_bytes": 99_999_999})
    (run / "inputs").mkdir()
    (run / "inputs" / "ablation.json").write_text(json.dumps({"tokens": 32768, "limit": 100, "rows": {
        "PIEM+LSPS one-shot@0.2": {"method": "PIEM+LSPS one-shot", "ratio": 0.2, "ppl": 77.7321,
                                   "zeroshot_avg_acc": 0.4321, "params": 111000000, "decode_tok_s": 12.3}}}))
    (run / "manifest.json").write_text(json.dumps({
        "kind": "edgeprune-run", "status": "complete", "versions": {"edgeprune": "0.1.0"},
        "config": {"run": {"model": "default"}, "profile": {"device": "cpu"}},
        "stages": stages + [{"name": "report", "status": "pending", "key": "", "seconds": 0}]}))
    return run


def test_every_number_comes_from_the_run_directory(run_dir):
    data = collect(run_dir)
    assert data["models"]["baseline"]["ppl"] == 16.0123 and data["models"]["pruned"]["ppl"] == 19.8765
    assert len(data["artifacts"]) == 4  # the stale q4_k_m stage is not part of the run
    paths = write_report(run_dir)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    report = json.loads(paths["json"].read_text())
    for text in (md, page):
        for n in NUMBERS.values():
            assert f"{n['ppl']:.2f}" in text and f"{n['ttft']:.1f}" in text and f"{n['tps']:.1f}" in text
            assert f"{n['rss']:.0f}" in text and f"{n['size'] / 2**20:.1f}" in text
        assert "16.01" in text and "19.88" in text  # PyTorch PPL
        assert "0.6543" in text and "0.6012" in text  # zero-shot (piqa)
        assert "77.73" in text and "PIEM+LSPS one-shot" in text  # the ablation table
        assert "95.4" not in text  # the stale q4_k_m artifact (99,999,999 bytes)
    # per-layer table: widths before -> after from the plan, allocated ratio and sensitivity per layer
    assert "| 1 | 9→6 | 3→2 | 1536→1436 | 0.150 |" in md
    assert "0.8000" in md and "0.5000" in md
    # relative changes are computed, not typed: pruned GGUF PPL vs unpruned GGUF PPL
    assert f"({100 * (37.1828 / 31.4159 - 1):+.0f}%)" in md
    assert report["models"]["pruned"]["params"] == 111222333
    assert set(report["plots"]) == {"layers", "size", "quality", "speed"}
    for rel in report["plots"].values():
        assert (paths["markdown"].parent / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("data:image/png;base64,") == 4
    assert "src='http" not in page and 'src="http' not in page and "<script" not in page  # self-contained


def test_report_without_optional_parts(run_dir):
    (run_dir / "inputs" / "ablation.json").unlink()
    for name in list((run_dir / "stages").iterdir()):
        if name.name.startswith("profile-"):
            shutil.rmtree(name)
    data = collect(run_dir)
    assert data["ablation"] is None and all("ttft_ms" not in a for a in data["artifacts"])
    paths = write_report(run_dir)
    assert "Ablation" not in paths["markdown"].read_text()
    assert "plot-speed" not in paths["html"].read_text()


def test_readme_block_is_rewritten(run_dir, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore `{README_START}` in prose\n{README_START}\nold table\n{README_END}\nafter\n")
    update_readme(readme, collect(run_dir))
    text = readme.read_text()
    assert "old table" not in text and text.endswith("after\n")
    assert text.startswith(f"# x\n\nbefore `{README_START}` in prose\n{README_START}\n<!-- written by")
    block = text.split(README_START + "\n")[1].split(README_END)[0]
    assert "31.42" in block and "GGUF q8_0" in block and "pruned 20%" in block
    update_readme(readme, collect(run_dir))  # idempotent
    assert readme.read_text() == text
    readme.write_text("no markers\n")
    with pytest.raises(EdgePruneError, match="run-table"):
        update_readme(readme, collect(run_dir))


def test_cli_report(run_dir, tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgeprune", "report", str(run_dir)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert str(run_dir / "report" / "report.html") in p.stdout.replace("\n", "")
    assert (run_dir / "report" / "report.html").is_file()
    p = subprocess.run([sys.executable, "-m", "edgeprune", "report", str(tmp_path / "nothing")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "not a run directory" in p.stderr and "Traceback" not in p.stderr


def test_regenerate_keeps_the_stage_key(run_dir):
    _stage(run_dir, "report", {"html": "report.html"})
    regenerate(run_dir)
    assert json.loads((run_dir / "report" / "stage.json").read_text())["key"] == "key-report"
    assert (run_dir / "report" / "report.html").is_file()


# ---------------------------------------------------------------------------------------------- the browser


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p),
                None)


def _png_is_blank(png: bytes) -> bool:
    """A one-colour page decodes (zlib, before un-filtering) to a handful of distinct byte values; text and plots
    to hundreds."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(idat))) < 32


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (make install adds it with apt-get)")
def test_html_renders_in_headless_chromium(run_dir, tmp_path):
    paths = write_report(run_dir)
    url = paths["html"].resolve().as_uri()
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    p = subprocess.run(base + ["--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    assert "Uncaught" not in p.stderr and not re.search(r"CONSOLE\(\d+\).*(error|Error)", p.stderr)
    imgs = re.findall(r"<img[^>]*class=\"plot\"[^>]*>", dom)
    assert {re.search(r'id="([^"]+)"', i).group(1) for i in imgs} == {"plot-layers", "plot-size", "plot-quality",
                                                                      "plot-speed"}
    for tag in imgs:
        src = re.search(r'src="data:image/png;base64,([^"]+)"', tag).group(1)
        assert base64.b64decode(src)[:4] == b"\x89PNG"
    assert dom.count("<table>") >= 6 and "Results vs the unpruned model" in dom
    # the plots are decoded and laid out: their rendered size is known to the page
    probe = tmp_path / "probe.html"
    probe.write_text(paths["html"].read_text().replace(
        "</body>", "<script>document.title = Array.from(document.images).map("
                   "i => i.complete && i.naturalWidth > 100 ? 'ok' : 'broken').join(',');</script></body>"))
    p = subprocess.run(base + ["--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert re.search(r"<title>ok,ok,ok,ok</title>", p.stdout), p.stdout[:500]
    shot = tmp_path / "shot.png"
    p = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,2000", url], capture_output=True,
                       text=True, timeout=180)
    assert shot.is_file(), p.stderr[-2000:]
    assert not _png_is_blank(shot.read_bytes())


def test_method_summary_names_every_recipe_step():
    from edgeprune.report import method_summary

    assert method_summary({"scorer": "piem", "allocator": "uniform"}) == "piem + uniform"
    assert method_summary({"scorer": "piem", "allocator": "lsps", "sensitivity": "bi", "rounds": 2,
                           "reconstruct": True, "recover_steps": 100}) == \
        "piem + lsps (bi sensitivity), 2 rounds, least-squares refit, 100 distillation steps"
