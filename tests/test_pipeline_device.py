"""`edgeprune run` with the profile stages on another machine: the local sshd "device" of conftest.py (this host's
python behind real SSH) and, when it is built, the emulated aarch64 device of `make device-sim`.

The measuring machine's identity is part of every profile stage's key (the same artifact measured elsewhere is
another stage; the rest of the run stays cached), each profile result says which machine measured it, and the
report's results table shows it, with emulated timings marked as no device timings.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SSHD, free_port, tiny_run_config
from edgeprune.devices import bundle, remote, sim

from edgeprune.pipeline import load_config, run_pipeline
from edgeprune.pipeline.engine import stage_key
from edgeprune.pipeline.profiling import Target
from edgeprune.pipeline.stages import Context, ProfileStage

TINY_TOML = """
[run]
model = "{model}"
out = "{out}"

[prune]
ratio = 0.3
n_samples = 4
seq_len = 32
reconstruct = false
recover_steps = 0

[evaluate]
seq_len = 32
max_tokens = 256
artifacts = false

[export]
artifacts = ["gguf:f32", "onnx:fp32"]

[profile]
prompt_tokens = 8
new_tokens = 3
repeats = 1
threads = 1
args = ["--warmup", "0"]

[report]
ablation = ""
"""
PROFILES = {f"profile-{v}-{f}-fp32" for v in ("baseline", "pruned") for f in ("gguf", "onnx")}
NO_SSHD = f"{SSHD} not found: `make install` installs Debian's openssh-server (apt-get install openssh-server)"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return tiny_run_config(tmp_path_factory.mktemp("pipeline-device"), TINY_TOML)


@pytest.fixture(scope="module")
def local_run(tiny_config):
    return run_pipeline(load_config(tiny_config), progress=False)


def ssh_sets(s, remote_dir, python=sys.executable) -> list[str]:
    return [f"profile.host={s.host}", f"profile.port={s.port}", f"profile.key={s.key}",
            f"profile.known_hosts={s.known_hosts}", f"profile.python={python}", f"profile.remote_dir={remote_dir}"]


def copy_run(run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run.run_dir, dest)
    return dest


def test_profile_stage_key_includes_the_machine(tmp_path):
    cfg = load_config(None, ["profile.device=rpi5"])
    target = Target(cfg.profile)
    assert target.remote is None  # rpi5 names no host: profiled here, with rpi5's settings
    stage = ProfileStage(Context(tmp_path, None, False), "pruned", "gguf", "q8_0", cfg.profile, target)
    keys = {}
    for name, ident in {"here": {"arch": "x86_64", "emulated": False}, "pi": {"arch": "aarch64", "emulated": False},
                        "emulated": {"arch": "aarch64", "emulated": True}}.items():
        target._identity = {"key": {**ident, "cpu_model": "X", "runtimes": {"llama-cpp-python": "0.3.36"}}}
        keys[name] = stage_key(stage.name, stage.inputs(), {})
    target._identity = {"key": {"arch": "x86_64", "emulated": False, "cpu_model": "X",
                                "runtimes": {"llama-cpp-python": "0.3.37"}}}
    keys["newer llama.cpp"] = stage_key(stage.name, stage.inputs(), {})
    assert len(set(keys.values())) == 4, keys
    # how the device is reached is not part of the key; the host is (through the identity)
    cfg2 = load_config(None, ["profile.device=rpi5", "profile.remote_dir=elsewhere", "profile.python=python3.11"])
    other = ProfileStage(Context(tmp_path, None, False), "pruned", "gguf", "q8_0", cfg2.profile, target)
    assert other.inputs() == stage.inputs()
    local = remote.local_identity()["key"]
    assert local["host"] is None and local["arch"] and "llama-cpp-python" in local["runtimes"]


@pytest.mark.parametrize("item, needle", [("profile.port=70000", "profile.port"),
                                          ("profile.key=/nonexistent/key", "SSH key not found")])
def test_bad_device_settings_fail_before_any_work(tiny_config, tmp_path, item, needle):
    from edgeprune.errors import EdgePruneError
    from edgeprune.pipeline import plan

    with pytest.raises(EdgePruneError, match=needle):
        plan(load_config(tiny_config, ["profile.host=pi@192.0.2.1", item], out=tmp_path / "r"), progress=False)


def test_local_profiles_say_which_machine(local_run):
    r = local_run.results
    assert PROFILES <= set(r)
    for name in PROFILES:
        m = r[name]["measured_on"]
        assert m["host"] is None and m["arch"] == os.uname().machine and m["emulated"] is False
        assert r[name]["identity"]["key"] == remote.local_identity()["key"]
    md = (local_run.run_dir / "report" / "report.md").read_text()
    assert "| measured on |" in md and f"this host ({os.uname().machine})" in md


@pytest.mark.skipif(not os.path.exists(SSHD), reason=NO_SSHD)
def test_pipeline_profiles_on_a_remote_device(local_run, tiny_config, sshd, tmp_path):
    run = copy_run(local_run, tmp_path)
    rdir = sshd.device / "pipeline"
    cfg = load_config(tiny_config, ssh_sets(sshd, rdir), out=run)
    result = run_pipeline(cfg, progress=False)
    s = result.statuses
    # the same artifacts measured on another machine: only the profile stages (and the report) run again
    assert {k for k, v in s.items() if v == "computed"} == PROFILES | {"report"}, s
    label = f"{sshd.host}:{sshd.port}"
    for name in PROFILES:
        res = result.results[name]
        assert res["measured_on"]["host"] == label and res["identity"]["host"] == label
        assert res["decode_tokens_per_s"] > 0
        doc = json.loads((run / "stages" / name / "profile.json").read_text())
        assert doc["ship"]["host"] == label  # shipped, verified and profiled over SSH
    assert len(sorted(rdir.rglob(bundle.COMPLETE))) == 4
    md = (run / "report" / "report.md").read_text()
    assert f"{label} ({os.uname().machine})" in md and f"Profiles measured on {label}" in md
    # the device answers the same: nothing is re-measured
    again = run_pipeline(load_config(tiny_config, ssh_sets(sshd, rdir), out=run), progress=False)
    assert set(again.statuses.values()) == {"cached"}
    # the device profile's [ssh] host is enough (no --set profile.host)
    dev = tmp_path / "mydevice.toml"
    dev.write_text(f'[remote]\npython = "{sys.executable}"\ndir = "{sshd.device / "by-profile"}"\n'
                   f'[ssh]\nhost = "{sshd.host}"\nport = {sshd.port}\nkey = "{sshd.key}"\n'
                   f'known_hosts = "{sshd.known_hosts}"\n')
    third = run_pipeline(load_config(tiny_config, [f"profile.device={dev}"], out=run), progress=False)
    assert all(third.results[n]["measured_on"]["host"] == label for n in PROFILES)
    assert len(sorted((sshd.device / "by-profile").rglob(bundle.COMPLETE))) == 4


@pytest.mark.skipif(not os.path.exists(SSHD), reason=NO_SSHD)
def test_unreachable_device_is_one_line(local_run, tiny_config, sshd, tmp_path):
    run = copy_run(local_run, tmp_path)
    sets = [x for s in ssh_sets(sshd, sshd.device / "x") if not s.startswith("profile.port=")
            for x in ("--set", s)]
    p = subprocess.run([sys.executable, "-m", "edgeprune", "run", str(tiny_config), "--out", str(run), "--quiet",
                        *sets, "--set", f"profile.port={free_port()}"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "cannot identify the profiling device" in p.stderr and "connection refused" in p.stderr, p.stderr
    man = json.loads((run / "manifest.json").read_text())
    assert man["status"] == "failed" and not (sshd.device / "x").exists()


SIM_REASON = sim.unavailable_reason()


@pytest.mark.slow
@pytest.mark.skipif(SIM_REASON is not None, reason=SIM_REASON or "")
@pytest.mark.skipif(not os.path.exists(SSHD), reason=NO_SSHD)
def test_pipeline_profiles_on_emulated_aarch64(local_run, tiny_config, sshd, tmp_path):
    run = copy_run(local_run, tmp_path)
    cfg = load_config(tiny_config, [*ssh_sets(sshd, sshd.device / "arm", sim.find().python), "profile.device=rpi5"],
                      out=run)
    result = run_pipeline(cfg, progress=False)
    for name in PROFILES:
        m = result.results[name]["measured_on"]
        assert m["arch"] == "aarch64" and m["emulated"] is True and m["device_profile"] == "rpi5"
        assert result.results[name]["identity"]["key"]["emulated"] is True
    md = (Path(run) / "report" / "report.md").read_text()
    assert "(aarch64, EMULATED: not device timings)" in md and "these timings are not device timings" in md
