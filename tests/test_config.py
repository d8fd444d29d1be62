"""One typed configuration: `edgeprune prune`'s options, `edgeprune run`'s [prune] section and PruneConfig have the
same fields and defaults; unknown keys and bad device/dtype values are one-line errors."""

import subprocess
import sys
from dataclasses import fields

import pytest
import typer

from edgeprune.cli import app
from edgeprune.cli_options import cli_fields
from edgeprune.config import DataSpec, ModelLoad, PruneConfig, default_of
from edgeprune.errors import EdgePruneError
from edgeprune.pipeline import defaults, load_config


def _command(name):
    return typer.main.get_command(app).commands[name]


def _options(name) -> dict[str, object]:
    """option flag -> default of a command's options."""
    return {next(o for o in p.opts if o.startswith("--")): p.default for p in _command(name).params
            if any(o.startswith("--") for o in p.opts)}


def _expected(cls, only=None) -> dict[str, object]:
    out = {}
    for _, flag, f in cli_fields(cls, only):
        d = default_of(f)
        out[flag] = (",".join(map(str, d)) or None) if isinstance(d, list) else d
    return out


def test_prune_options_are_the_config_fields():
    opts = _options("prune")
    expected = {**_expected(PruneConfig), **_expected(ModelLoad), **_expected(DataSpec, ("calib",))}
    assert {k: opts[k] for k in expected} == expected
    assert set(opts) - set(expected) == {"--output", "--json"}  # nothing else, nothing hand-copied
    # every PruneConfig field but the Python-only scorer_options and unit_cost (edgeprune fit) is an option
    assert {f.name for f in fields(PruneConfig)} - {f.name for _, _, f in cli_fields(PruneConfig)} == {
        "scorer_options", "unit_cost"}


def test_run_prune_section_has_the_same_fields_and_defaults(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    cfg = load_config(empty)
    assert cfg.prune == PruneConfig() and cfg.data == DataSpec()
    assert set(defaults()["prune"]) == {f.name for _, _, f in cli_fields(PruneConfig)}
    assert (cfg.run.device, cfg.run.dtype) == ("cpu", "float32")


def test_defaults_are_the_measured_best_recipe():
    c = PruneConfig()
    assert (c.scorer, c.allocator, c.sensitivity, c.reconstruct, c.n_samples) == ("piem", "lsps", "bi", True, 64)
    assert c.rounds > 1 and c.recover_steps == 0  # multi-round; distillation stays opt-in
    assert DataSpec().calib == "auto"


def test_score_eval_and_run_take_device_and_dtype():
    for name in ("score", "prune", "eval", "run"):
        assert {"--device", "--dtype"} <= set(_options(name)), name


@pytest.mark.parametrize("value,sections", [("cuda:1", {"run": "cuda:1", "profile": "cpu"}),
                                            ("rpi5", {"run": "cpu", "profile": "rpi5"}),
                                            ("cpu", {"run": "cpu", "profile": "cpu"})])
def test_run_device_keeps_its_profile_meaning(tmp_path, value, sections):
    path = tmp_path / "c.toml"
    path.write_text('[profile]\ndevice = "jetson-orin-nano"\n' if value != "cpu" else "")
    cfg = load_config(path, device=value)
    profile = "jetson-orin-nano" if value == "cuda:1" else sections["profile"]
    assert (cfg.run.device, cfg.profile.device) == (sections["run"], profile)


@pytest.mark.parametrize("kwargs,needle", [(dict(device="tpu"), "unknown device 'tpu'"),
                                           (dict(dtype="int4"), "unknown dtype 'int4'")])
def test_bad_device_or_dtype(kwargs, needle):
    with pytest.raises(EdgePruneError, match=needle):
        ModelLoad(**kwargs).validate()


@pytest.mark.parametrize("args,needle", [(["prune", "--device", "tpu"], "unknown device"),
                                         (["eval", "--dtype", "int4"], "unknown dtype"),
                                         (["score", "--device", "cuda:x"], "unknown device"),
                                         (["run", "--set", "prune.bogus=1"], "unknown key prune.bogus"),
                                         (["run", "--set", "run.dtype=float8"], "unknown dtype")])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    p = subprocess.run([sys.executable, "-m", "edgeprune", *args, *(["--out", str(tmp_path / "r")]
                        if args[0] == "run" else [])], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr


def test_piem_weights_from_cli_string_and_toml():
    assert PruneConfig(piem_weights=[0.2, 0.2, 0.6]).scorer_kwargs() == {"alpha": 0.2, "beta": 0.2, "gamma": 0.6}
    with pytest.raises(EdgePruneError, match="three numbers"):
        PruneConfig(piem_weights=[0.2, 0.8]).scorer_kwargs()
    with pytest.raises(EdgePruneError, match="only applies to the piem scorer"):
        PruneConfig(scorer="magnitude", piem_weights=[0.2, 0.2, 0.6]).scorer_kwargs()
