"""`edgeprune run` on a tiny model: every stage runs once, a rerun recomputes nothing, a changed ratio recomputes
the pruned model's stages only, a failed or interrupted stage leaves the earlier ones intact and the next run
resumes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_run_config

from edgeprune.errors import EdgePruneError
from edgeprune.pipeline import defaults, dump_toml, load_config, parse_override, plan, run_pipeline
from edgeprune.pipeline.stages import ExportStage, ProfileStage

TINY_TOML = """
[run]
model = "{model}"
out = "{out}"

[prune]
ratio = 0.3
n_samples = 8
seq_len = 64
rounds = 2
reconstruct = true
recover_steps = 3

[evaluate]
seq_len = 64
max_tokens = 1024
threads = 1

[export]
artifacts = ["gguf:f32", "onnx:fp32"]

[profile]
prompt_tokens = 16
new_tokens = 4
repeats = 1
threads = 1

[report]
ablation = ""
"""

BASELINE = {"eval-baseline", "export-baseline-gguf-fp32", "export-baseline-onnx-fp32", "ppl-baseline-gguf-fp32",
            "ppl-baseline-onnx-fp32", "profile-baseline-gguf-fp32", "profile-baseline-onnx-fp32"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return tiny_run_config(tmp_path_factory.mktemp("pipeline"), TINY_TOML)


@pytest.fixture(scope="module")
def first_run(tiny_config):
    return run_pipeline(load_config(tiny_config), progress=False)


def statuses(result) -> dict[str, str]:
    return result.statuses


def test_first_run_computes_every_stage(first_run):
    s = statuses(first_run)
    assert set(s.values()) == {"computed"}
    assert set(s) == BASELINE | {"prune", "eval-pruned", "export-pruned-gguf-fp32", "export-pruned-onnx-fp32",
                                 "ppl-pruned-gguf-fp32", "ppl-pruned-onnx-fp32", "profile-pruned-gguf-fp32",
                                 "profile-pruned-onnx-fp32", "report"}
    run = first_run.run_dir
    man = json.loads((run / "manifest.json").read_text())
    assert man["kind"] == "edgeprune-run" and man["status"] == "complete"
    assert (run / "stages" / "prune" / "model" / "config.json").is_file()
    assert (run / "stages" / "export-pruned-onnx-fp32" / "artifact" / "model.onnx").is_file()
    assert (run / "stages" / "export-pruned-gguf-fp32" / "artifact" / "model.gguf").is_file()
    for name in ("report.html", "report.md", "report.json"):
        assert (run / "report" / name).is_file()
    page = (run / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "pruned 30%" in page
    r = first_run.results
    # the same tokens in every runtime: fp32 artifacts reproduce PyTorch's PPL
    for v in ("baseline", "pruned"):
        torch_ppl = r[f"eval-{v}"]["ppl"]["ppl"]
        for fmt in ("gguf", "onnx"):
            assert r[f"ppl-{v}-{fmt}-fp32"]["ppl"] == pytest.approx(torch_ppl, rel=2e-3)
            prof = r[f"profile-{v}-{fmt}-fp32"]
            assert prof["ttft_ms"] > 0 and prof["decode_tokens_per_s"] > 0 and prof["peak_rss_mib"] > 0
    assert r["eval-pruned"]["params"]["total"] < r["eval-baseline"]["params"]["total"]
    # the whole recipe ran: two rounds, then distillation, recorded in the checkpoint's manifest
    pruned = json.loads((run / "stages" / "prune" / "model" / "manifest.json").read_text())
    assert len(pruned["rounds"]) == 2 and pruned["recovery"]["config"]["steps"] == 3
    assert "2 rounds, least-squares refit, 3 distillation steps" in (run / "report" / "report.md").read_text()
    assert not list(run.rglob(".*.tmp"))  # no temp directories left behind


def test_rerun_recomputes_nothing(first_run, tiny_config):
    again = run_pipeline(load_config(tiny_config), progress=False)
    assert set(statuses(again).values()) == {"cached"}
    assert again.results == first_run.results


def test_cli_rerun_is_cached_and_prints_the_report(first_run, tiny_config):
    p = cli("run", str(tiny_config), "--quiet")
    assert p.returncode == 0, p.stderr
    assert "computed" not in p.stderr and "report:" in p.stdout and "report.html" in p.stdout
    assert "0 computed" in p.stdout


def test_changed_ratio_recomputes_the_pruned_side_only(first_run, tiny_config, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(first_run.run_dir, run)
    result = run_pipeline(load_config(tiny_config, ["prune.ratio=0.4"], out=run), progress=False)
    s = statuses(result)
    assert {k for k, v in s.items() if v == "cached"} == BASELINE
    assert {k for k, v in s.items() if v == "computed"} == set(s) - BASELINE
    assert result.results["prune"]["config"]["ratio"] == 0.4
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["prune"]["config"]["ratio"] == 0.4


def test_zero_shot_recomputes_the_evaluations_only(first_run, tiny_config, tmp_path):
    tasks = tmp_path / "tasks" / "arc_easy"
    tasks.mkdir(parents=True)
    rows = [{"query": f"Question: what is {i} plus one?", "choices": [str(i + 1), str(i + 7)], "gold": 0}
            for i in range(3)]
    (tasks / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    shutil.copytree(first_run.run_dir, run)
    result = run_pipeline(load_config(tiny_config, ["evaluate.tasks=arc_easy", f"evaluate.tasks_dir={tasks.parent}",
                                                    "evaluate.limit=2"], out=run), progress=False)
    s = statuses(result)
    assert {k for k, v in s.items() if v == "computed"} == {"eval-baseline", "eval-pruned", "report"}
    assert result.results["eval-pruned"]["zeroshot"]["tasks"]["arc_easy"]["n"] == 2
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["models"]["baseline"]["zeroshot"]["arc_easy"] == result.results["eval-baseline"]["zeroshot"][
        "tasks"]["arc_easy"]["acc"]
    assert "Zero-shot accuracy" in (run / "report" / "report.md").read_text()


def test_failed_stage_stops_keeps_earlier_stages_and_resumes(first_run, tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(first_run.run_dir, run)
    cfg = load_config(tiny_config, ["profile.new_tokens=3"], out=run)  # only the profile stages change
    before = (run / "stages" / "profile-baseline-gguf-fp32" / "stage.json").read_text()

    def boom(self, out):
        (out / "partial.json").write_text("{}")
        raise EdgePruneError("the device is on fire")

    monkeypatch.setattr(ProfileStage, "run", boom)
    with pytest.raises(EdgePruneError, match="stage profile-baseline-gguf-fp32 failed: the device is on fire"):
        run_pipeline(cfg, progress=False)
    man = json.loads((run / "manifest.json").read_text())
    by = {s["name"]: s for s in man["stages"]}
    assert man["status"] == "failed" and by["profile-baseline-gguf-fp32"]["status"] == "failed"
    assert by["prune"]["status"] == "cached" and by["report"]["status"] == "pending"
    # the failed stage's directory is the previous complete one, untouched; nothing half-written
    assert (run / "stages" / "profile-baseline-gguf-fp32" / "stage.json").read_text() == before
    assert not (run / "stages" / "profile-baseline-gguf-fp32" / "partial.json").exists()
    assert not list(run.rglob(".*.tmp"))
    assert (run / "logs" / "profile-baseline-gguf-fp32.log").is_file()

    monkeypatch.undo()
    result = run_pipeline(cfg, progress=False)
    s = statuses(result)
    assert {k for k, v in s.items() if v == "computed"} == {k for k in s if k.startswith("profile-")} | {"report"}


def test_interrupted_run_resumes(first_run, tiny_config, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(first_run.run_dir, run)
    shutil.rmtree(run / "stages" / "export-pruned-onnx-fp32")  # as if the first run had stopped here
    cfg = load_config(tiny_config, out=run)
    real = ExportStage.run

    def interrupted(self, out):
        if (self.variant, self.format) == ("pruned", "onnx"):
            (out / "half-written").write_text("x")
            raise KeyboardInterrupt
        return real(self, out)

    monkeypatch.setattr(ExportStage, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, progress=False)
    assert not (run / "stages" / "export-pruned-onnx-fp32").exists()
    assert not list(run.rglob(".*.tmp"))
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "interrupted"
    monkeypatch.undo()
    killed = run / "stages" / ".export-pruned-onnx-fp32.abc123.tmp"  # what SIGKILL mid-stage would leave
    killed.mkdir()
    (killed / "model.onnx").write_text("half")
    s = statuses(run_pipeline(cfg, progress=False))
    assert not killed.exists()
    # only the missing export is recomputed; its downstream stages' inputs (the artifact) are the same
    computed = {k for k, v in s.items() if v == "computed"}
    assert computed == {"export-pruned-onnx-fp32"}


# --------------------------------------------------------------------------------------------- configuration


def test_config_layers_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[prune]\nratio = 0.25\n[export]\nartifacts = ["onnx:int8"]\n')
    cfg = load_config(path, ["prune.scorer=magnitude", "evaluate.tasks=piqa,boolq", "profile.repeats=5",
                             'data.eval=["missing.txt", "builtin"]', "evaluate.artifacts=false"],
                      ratio=0.3, out=tmp_path / "o", device="rpi5", model=None)
    assert cfg.prune.ratio == 0.3 and cfg.prune.scorer == "magnitude"
    assert cfg.evaluate.tasks == ["piqa", "boolq"] and cfg.profile.repeats == 5
    assert cfg.data.eval == ["missing.txt", "builtin"] and cfg.evaluate.artifacts is False
    assert cfg.run.out == str(tmp_path / "o") and cfg.profile.device == "rpi5" and cfg.run.device == "cpu"
    assert cfg.run.model == defaults()["run"]["model"] and cfg.export.artifacts == ["onnx:int8"]
    # the run directory's config.toml reads back to the same settings
    (tmp_path / "again.toml").write_text(dump_toml(cfg))
    assert load_config(tmp_path / "again.toml") == cfg


def test_packaged_demo_config_is_valid():
    cfg = load_config("demo")
    assert cfg.run.model == "default" and cfg.prune.allocator == "lsps"
    assert set(cfg.export.artifacts) == {"gguf:q8_0", "onnx:int8"}


@pytest.mark.parametrize("item,needle", [
    ("prune.rati=0.3", "unknown key prune.rati"),
    ("pruning.ratio=0.3", "unknown section [pruning]"),
    ("prune.ratio=high", "prune.ratio must be a number"),
    ("profile.repeats=2.5", "profile.repeats must be an integer"),
    ("ratio", "SECTION.KEY=VALUE"),
])
def test_bad_overrides(item, needle):
    with pytest.raises(EdgePruneError) as e:
        load_config(None, [item])
    assert needle in str(e.value)


def test_parse_override_values():
    assert parse_override("prune.ratio=0.3") == ("prune", "ratio", 0.3)
    assert parse_override("data.eval=../x/wiki.test.raw") == ("data", "eval", "../x/wiki.test.raw")
    assert parse_override('export.artifacts=["onnx:fp32"]') == ("export", "artifacts", ["onnx:fp32"])


@pytest.mark.parametrize("overrides,needle", [
    (["export.artifacts=onnx:q4_k_m"], "GGUF type"),
    (["export.artifacts=tflite:int8"], "not FORMAT:DTYPE"),
    (["prune.ratio=1.5"], "--ratio must be in [0, 1)"),
    (["prune.allocator=magic"], "unknown allocator"),
    (["data.calib=/no/such/file.txt"], "text not found: /no/such/file.txt"),
    (["data.calib=[\"/no/such/file.txt\", \"/no/such/other.txt\"]"], "none of the calib texts exist"),
    (["evaluate.tasks=piqa", "evaluate.tasks_dir=/no/such/dir"], "piqa data file not found"),
    (["run.model=/no/such/model"], "model not found"),
    (["prune.stream=true", "prune.sensitivity=loss"], "use --sensitivity bi"),
    (["prune.stream=true", "prune.recover_steps=0", "run.device=cuda"], "--stream runs on the CPU"),
])
def test_plan_errors_before_any_work(tmp_path, overrides, needle):
    cfg = load_config(None, overrides, out=tmp_path / "run")
    with pytest.raises(EdgePruneError) as e:
        run_pipeline(cfg, progress=False)
    assert needle in str(e.value)
    assert not (tmp_path / "run" / "stages").exists()  # nothing ran


def test_one_run_per_directory(tmp_path):
    import fcntl

    run, model = tmp_path / "run", tmp_path / "model"
    run.mkdir()
    model.mkdir()
    (model / "config.json").write_text("{}")  # planning hashes the files, it does not load them
    with open(run / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(EdgePruneError, match="another `edgeprune run` is using"):
            run_pipeline(load_config(None, ["export.artifacts=[]"], out=run, model=str(model)), progress=False)
    assert not (run / "stages").exists()


def test_cli_errors_are_one_line(tmp_path):
    for args, needle in ((["--ratio", "1.5"], "--ratio must be in [0, 1)"),
                         (["no-such-config.toml"], "config not found")):
        p = cli("run", *args, "--out", str(tmp_path / "run"), "--quiet")
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_demo_config_plans_on_the_default_model(tmp_path):
    """The demo's stage list on the real model, without running it (`make demo` runs it)."""
    cfg = load_config("demo", out=tmp_path / "run")
    stages = plan(cfg, progress=False)
    names = [s.name for s in stages]
    assert names[:3] == ["eval-baseline", "prune", "eval-pruned"] and names[-1] == "report"
    assert {f"export-{v}-{f}" for v in ("baseline", "pruned") for f in ("gguf-q8_0", "onnx-int8")} <= set(names)
    assert Path(cfg.run.out) == tmp_path / "run"


GEMMA_TOML = """
[run]
model = "{model}"
out = "{out}"

[prune]
ratio = 0.4
allocator = "global"
n_samples = 4
seq_len = 32
rounds = 1

[evaluate]
seq_len = 32
max_tokens = 256
threads = 1

[export]
artifacts = ["gguf:f32"]

[profile]
prompt_tokens = 8
new_tokens = 2
repeats = 1
threads = 1

[report]
ablation = ""
"""


def test_an_artifact_the_format_cannot_hold_is_reported_not_fatal(tmp_path):
    """Gemma 3 pruned to per-layer widths has no llama.cpp architecture (no per-layer Gemma arch): the run still
    ends in a report, the pruned GGUF's export, PPL and profile stages say why there is no artifact, the baseline's
    GGUF is measured as usual, and `edgeprune export` itself still refuses in one line."""
    from edgeprune.adapters.base import is_uniform
    from edgeprune.models import load
    from edgeprune.models.tiny import build_tiny

    lm = build_tiny("gemma3_text")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    cfg = tmp_path / "gemma.toml"
    cfg.write_text(GEMMA_TOML.format(model=tmp_path / "tiny", out=tmp_path / "run"))
    result = run_pipeline(load_config(cfg), progress=False)
    pruned = tmp_path / "run" / "stages" / "prune" / "model"
    assert not is_uniform(load(str(pruned)).adapter.shapes())  # the precondition: per-layer widths
    res = result.results
    for kind in ("export", "ppl", "profile"):
        why = res[f"{kind}-pruned-gguf-fp32"]["skipped"]
        assert "gemma3_text" in why and why.endswith("prune with --allocator uniform and --no-reconstruct to export it")
        assert "skipped" not in res[f"{kind}-baseline-gguf-fp32"]
    assert not (tmp_path / "run" / "stages" / "export-pruned-gguf-fp32" / "artifact").exists()
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "Not exported, pruned GGUF fp32: cannot export this gemma3_text checkpoint" in report
    r = cli("export", str(pruned), "--format", "gguf", "--dtype", "fp32", "-o", str(tmp_path / "x"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--allocator uniform" in r.stderr


def test_the_report_takes_the_ablation_of_the_runs_model(tmp_path):
    """A run of another model never shows the default model's ablation table; it takes ablation-MODEL.json."""
    from edgeprune.pipeline.plan import _ablation_source

    default = tmp_path / "ablation.json"
    default.write_text(json.dumps({"rows": {}}))  # written before the files named their model: the default's
    cfg = load_config("demo", [f"report.ablation={default}"])
    assert _ablation_source(cfg) == default
    gemma = load_config("demo", [f"report.ablation={default}", "run.model=gemma3-270m"])
    assert _ablation_source(gemma) is None
    (tmp_path / "ablation-gemma3-270m.json").write_text(json.dumps({"model": "gemma3-270m", "rows": {}}))
    assert _ablation_source(gemma) == tmp_path / "ablation-gemma3-270m.json"
    path_model = load_config("demo", [f"report.ablation={default}", f"run.model={tmp_path / 'ck'}"])
    assert _ablation_source(path_model) is None
