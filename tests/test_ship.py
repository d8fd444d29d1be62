"""`edgeprune ship` against a real OpenSSH server on 127.0.0.1 standing in for the device.

The sshd runs from a temp directory (its own host key, an authorized user key, a custom port, StrictModes and PAM
off); the "device" directory is a temp directory and the device's python is this interpreter. Debian's
openssh-server is installed by `make install`; without /usr/sbin/sshd these tests skip.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SSHD, free_port
from edgeprune.devices import bundle

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--threads", "1", "--prompt-lengths", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0"]

pytestmark = [
    pytest.mark.skipif(not os.path.exists(SSHD), reason=f"{SSHD} not found: `make install` installs Debian's "
                       "openssh-server (apt-get install openssh-server) for these tests"),
    pytest.mark.skipif(not (shutil.which("ssh") and shutil.which("scp") and shutil.which("ssh-keygen")),
                       reason="the OpenSSH client (ssh, scp, ssh-keygen) is not installed"),
]


def ssh_args(s, remote_dir, **over) -> list[str]:
    opts = {"--host": s.host, "--port": str(s.port), "--key": str(s.key), "--known-hosts": str(s.known_hosts),
            "--python": sys.executable, "--remote-dir": str(remote_dir)}
    opts.update({k: v for k, v in over.items() if v is not None})
    return [x for k, v in opts.items() for x in (k, v)]


def ship(artifact, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgeprune", "ship", str(artifact), *args], capture_output=True,
                          text=True, timeout=timeout)


def completes(remote_dir: Path) -> list[Path]:
    return sorted(remote_dir.rglob(bundle.COMPLETE))


TRANSPORTS = ["scp", pytest.param("rsync", marks=pytest.mark.skipif(not shutil.which("rsync"),
                                                                     reason="rsync is not installed"))]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ship_and_profile(sshd, artifacts, tmp_path, transport):
    remote = sshd.device / f"ok-{transport}"
    out = tmp_path / "profile.json"
    p = ship(artifacts["gguf"], "--device", "rpi5", *ssh_args(sshd, remote), "--transport", transport, *QUICK,
             "--json", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    s = doc["ship"]
    assert doc["schema"] == "edgeprune.profile/1" and doc["device"] == "rpi5"
    assert s["transport"] == transport and s["reused"] == [] and len(s["uploaded"]) == s["files"]
    final = Path(s["bundle"])
    assert final.parent == remote / "bundles" and (final / bundle.COMPLETE).is_file()
    assert not list(remote.glob("bundles/*.partial"))
    # every file of the bundle, with its sha256, and the device code next to the artifact
    manifest = json.loads((final / "bundle.json").read_text())
    assert {"artifact/model.gguf", "artifact/tokenizer.json", "artifact/manifest.json", "edgeprune_device/profiler.py",
            "edgeprune_device/llama_generate.py", "edgeprune_device/bundle.py"} <= set(manifest["files"])
    assert manifest["files"]["artifact/model.gguf"]["sha256"] == bundle.sha256_file(artifacts["gguf"] / "model.gguf")
    assert not list(final.rglob("__pycache__"))
    # the profile ran there and came back
    assert doc["artifact"]["name"] == artifacts["gguf"].name and doc["artifact"]["bundle_id"] == s["bundle_id"]
    assert doc["artifact"]["manifest_sha256"] == bundle.sha256_file(artifacts["gguf"] / "manifest.json")
    assert doc["memory_check"]["budget_mb"] == 6144 and doc["decode"]["tokens_per_s"] > 0
    assert Path(s["remote_result"]).is_file() and json.loads(Path(s["remote_result"]).read_text())["load_s"] > 0
    assert "decode after" in p.stdout and "[rpi5]" in p.stderr  # the device's progress, streamed

    # a rerun finds the complete bundle, re-verifies it there and uploads nothing
    p = ship(artifacts["gguf"], "--device", "rpi5", *ssh_args(sshd, remote), "--transport", transport,
             "--no-profile", "--json", str(out))
    assert p.returncode == 0, p.stderr
    s = json.loads(out.read_text())["ship"]
    assert s["uploaded"] == [] and s["rechecked"] and len(s["reused"]) == s["files"]


def test_ship_onnx_and_repair_on_device(sshd, artifacts, tmp_path):
    remote = sshd.device / "onnx"
    out = tmp_path / "profile.json"
    p = ship(artifacts["onnx"], "--device", "cpu", *ssh_args(sshd, remote), *QUICK, "--json", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["runtime"]["name"] == "onnxruntime" and doc["runtime"]["execution_provider"] == "CPUExecutionProvider"
    # a file changes on the device: the next ship notices, uploads only that file and verifies again
    final = Path(doc["ship"]["bundle"])
    (final / "artifact" / "tokenizer.json").write_text("{}")
    p = ship(artifacts["onnx"], "--device", "cpu", *ssh_args(sshd, remote), "--no-profile", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text())["ship"]["uploaded"] == ["artifact/tokenizer.json"]
    assert "re-uploading" in p.stderr
    assert bundle.sha256_file(final / "artifact" / "tokenizer.json") == \
        bundle.sha256_file(artifacts["onnx"] / "tokenizer.json")


@pytest.mark.parametrize("case", ["wrong-port", "unroutable"])
def test_unreachable_host_fails_fast(sshd, artifacts, case):
    if case == "wrong-port":
        args = ssh_args(sshd, sshd.device / "x", **{"--port": str(free_port())})
        needle = "connection refused"
    else:  # TEST-NET-1 (RFC 5737): never routed; either no route at once or no answer within the timeout
        args = ssh_args(sshd, sshd.device / "x", **{"--host": "root@192.0.2.1", "--port": "22"})
        needle = "cannot connect to root@192.0.2.1:22"
    start = time.perf_counter()
    p = ship(artifacts["gguf"], "--device", "cpu", *args, "--connect-timeout", "3", timeout=60)
    elapsed = time.perf_counter() - start
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert elapsed < 30


def test_auth_failure(sshd, artifacts):
    p = ship(artifacts["gguf"], "--device", "cpu", *ssh_args(sshd, sshd.device / "x",
                                                              **{"--key": str(sshd.stranger_key)}), timeout=60)
    assert p.returncode == 2 and "authentication failed for" in p.stderr and "Permission denied" in p.stderr
    assert "Traceback" not in p.stderr and not (sshd.device / "x").exists()


def test_host_key_is_checked(sshd, artifacts, tmp_path):
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {(sshd.dir / 'stranger.pub').read_text()}")
    for kh in (empty, wrong):  # unknown host key, then a different key: refused, never accepted silently
        p = ship(artifacts["gguf"], "--device", "cpu",
                 *ssh_args(sshd, sshd.device / "x", **{"--known-hosts": str(kh)}), timeout=60)
        assert p.returncode == 2 and "host key of" in p.stderr and "not trusted" in p.stderr, p.stderr
    assert not (sshd.device / "x").exists()


def test_device_without_requirements(sshd, artifacts, tmp_path):
    p = ship(artifacts["gguf"], "--device", "cpu", *ssh_args(sshd, sshd.device / "x",
                                                              **{"--python": "/nonexistent/python3"}), timeout=60)
    assert p.returncode == 2 and "remote python '/nonexistent/python3' not found" in p.stderr
    # a python without numpy/psutil/llama-cpp-python: a clear list of what to install, nothing uploaded
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    p = ship(artifacts["gguf"], "--device", "cpu", *ssh_args(sshd, sshd.device / "bare",
                                                              **{"--python": str(bare / "bin" / "python")}))
    assert p.returncode == 2 and "lacks numpy, psutil, llama_cpp" in p.stderr
    assert "pip install numpy psutil llama-cpp-python" in p.stderr
    assert not list((sshd.device / "bare").rglob("model.gguf"))


def _wait_for(pred, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_interrupted_transfer_resumes(sshd, artifacts, tmp_path, transport):
    """Kill `edgeprune ship` in the middle of the model upload (throttled with --bwlimit): the bundle on the device
    is not complete and cannot be profiled; a rerun resumes (files already there are kept) and completes."""
    remote = sshd.device / f"interrupted-{transport}"
    size = (artifacts["gguf"] / "model.gguf").stat().st_size
    proc = subprocess.Popen([sys.executable, "-m", "edgeprune", "ship", str(artifacts["gguf"]), "--device", "cpu",
                             *ssh_args(sshd, remote), "--transport", transport, "--bwlimit", "64", *QUICK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def partial_model():
        # scp writes the file under its name; rsync into a temp file (.model.gguf.XXXX) until it is done
        files = list(remote.glob("bundles/*.partial/artifact/*model.gguf*"))
        return any(0 < f.stat().st_size < size for f in files)

    try:
        assert _wait_for(partial_model, 60), "the upload never started"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)
    time.sleep(0.5)  # let the device side notice the closed connection
    assert proc.returncode != 0
    assert completes(remote) == [] and not [d for d in remote.glob("bundles/*") if not d.name.endswith(".partial")]
    staging = next(remote.glob("bundles/*.partial"))
    model = staging / "artifact" / "model.gguf"
    assert not model.exists() or model.stat().st_size < size  # what arrived is kept, and is not the model

    out = tmp_path / "p.json"
    p = ship(artifacts["gguf"], "--device", "cpu", *ssh_args(sshd, remote), "--transport", transport, *QUICK,
             "--json", str(out))
    assert p.returncode == 0, p.stderr
    s = json.loads(out.read_text())["ship"]
    assert "artifact/model.gguf" in s["uploaded"]
    assert "artifact/config.json" in s["reused"]  # uploaded before the model, kept
    assert len(completes(remote)) == 1 and not list(remote.glob("bundles/*.partial"))
    assert bundle.sha256_file(Path(s["bundle"]) / "artifact" / "model.gguf") == \
        bundle.sha256_file(artifacts["gguf"] / "model.gguf")


def test_interrupted_transfer_then_corrupt_partial(sshd, artifacts, tmp_path, monkeypatch):
    """Deterministic variant through the Python API: the upload fails half-way, then a truncated file is left in
    the staging directory; the bundle is never complete, and the next ship repairs it."""
    from edgeprune.devices import profiles
    from edgeprune.devices import ship as shipmod
    from edgeprune.devices.ssh import Remote

    from edgeprune.errors import EdgePruneError

    remote_dir = sshd.device / "api"
    prof = profiles.load("cpu")
    remote = Remote(host=sshd.host, port=sshd.port, key=str(sshd.key), known_hosts=str(sshd.known_hosts))
    real_upload = shipmod.Shipper.upload

    def half_upload(self, files, transport, bwlimit):
        real_upload(self, files[: len(files) // 2], transport, bwlimit)
        raise EdgePruneError("upload interrupted (simulated)")

    monkeypatch.setattr(shipmod.Shipper, "upload", half_upload)
    with pytest.raises(EdgePruneError, match="simulated"):
        shipmod.ship(artifacts["gguf"], prof, remote, python=sys.executable, remote_dir=str(remote_dir),
                     transport="scp", run_profile=False, quiet=True)
    assert completes(remote_dir) == []
    staging = next(remote_dir.glob("bundles/*.partial"))
    model = staging / "artifact" / "model.gguf"
    model.write_bytes((artifacts["gguf"] / "model.gguf").read_bytes()[:4096])
    monkeypatch.setattr(shipmod.Shipper, "upload", real_upload)
    doc = shipmod.ship(artifacts["gguf"], prof, remote, python=sys.executable, remote_dir=str(remote_dir),
                       transport="scp", run_profile=False, quiet=True)
    assert "artifact/model.gguf" in doc["ship"]["uploaded"] and doc["ship"]["reused"]
    assert len(completes(remote_dir)) == 1


def _make(*args, timeout=300):
    # `-o install`: the venv is already installed (CI ran `make install`); never reinstall from a test
    return subprocess.run(["make", "--no-print-directory", "-o", "install", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_targets(sshd, artifacts, tmp_path):
    venv_bin = Path(sys.executable).parent
    common = [f"ARTIFACT={artifacts['gguf']}", f"PROFILE_ARGS={' '.join(QUICK)}", f"BIN={venv_bin}",
              f"PROFILES_OUT={tmp_path}"]
    p = _make("ship-rpi5", f"HOST={sshd.host}", f"PORT={sshd.port}", f"KEY={sshd.key}",
              f"KNOWN_HOSTS={sshd.known_hosts}", f"REMOTE_PYTHON={sys.executable}",
              f"REMOTE_DIR={sshd.device / 'make'}", *common)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / f"rpi5-{artifacts['gguf'].name}.json").read_text())
    assert doc["device"] == "rpi5" and doc["ship"]["host"] == f"{sshd.host}:{sshd.port}"
    assert len(completes(sshd.device / "make")) == 1
    # profile-DEVICE with HOST is the same ship; `make profile-jetson` means the Orin Nano profile
    p = _make("profile-jetson", f"HOST={sshd.host}", f"PORT={sshd.port}", f"KEY={sshd.key}",
              f"KNOWN_HOSTS={sshd.known_hosts}", f"REMOTE_PYTHON={sys.executable}",
              f"REMOTE_DIR={sshd.device / 'make'}", *common)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / f"jetson-orin-nano-{artifacts['gguf'].name}.json").read_text())
    assert doc["device"] == "jetson-orin-nano" and doc["runtime"]["n_gpu_layers"] == -1
    # profile-cpu runs here, no SSH
    p = _make("profile-cpu", *common)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((tmp_path / f"cpu-{artifacts['gguf'].name}.json").read_text())
    assert doc["device"] == "cpu" and "ship" not in doc
    # a ship target without HOST (and no host in the profile) says what is missing
    p = _make("ship-rpi4", *common)
    assert p.returncode != 0 and "--host" in p.stderr


def test_setup_x86_device_offline(sshd, artifacts, tmp_path):
    """`ship --setup` against this x86 "device": a python with nothing installed gets a venv in DIR/env with the
    ONNX runtimes, from wheels downloaded here (pip on the device runs from its wheel, with --no-index)."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    rdir = sshd.device / "setup-x86"
    out = tmp_path / "p.json"
    args = ["--device", "cpu", *ssh_args(sshd, rdir, **{"--python": str(bare / "bin" / "python")}), "--setup"]
    p = ship(artifacts["onnx"], *args, *QUICK, "--json", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["ship"]["remote_python"] == str(rdir / "env" / "python") and doc["arch"] == "x86_64"
    assert doc["emulated"] is False and doc["runtime"]["name"] == "onnxruntime"
    assert list((rdir / "env" / "venv").glob("lib/python*/site-packages/onnxruntime"))
    p = ship(artifacts["onnx"], *args, "--no-profile")
    assert p.returncode == 0 and "already has" in p.stderr, p.stderr
    # a wheel for another machine is refused before anything is installed
    fake = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl"
    fake.write_bytes(b"")
    p = ship(artifacts["gguf"], *ssh_args(sshd, sshd.device / "setup-bad", **{"--python": str(bare / "bin" / "python")}),
             "--device", "cpu", "--setup", "--wheel", str(fake))
    assert p.returncode == 2 and "does not install on the device (x86_64" in p.stderr, p.stderr
    p = ship(artifacts["onnx"], *ssh_args(sshd, rdir), "--device", "cpu", "--wheel", str(fake))
    assert p.returncode == 2 and "--wheel goes with --setup" in p.stderr
