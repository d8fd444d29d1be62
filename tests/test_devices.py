"""Device profiles, the torch-free on-device profiler, bundles and the memory check (no SSH here: test_ship.py)."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from edgeprune.devices import bundle, profiler, profiles

from edgeprune.errors import EdgePruneError

DEVICES = Path(profiler.__file__).resolve().parent
QUICK = ["--threads", "1", "--prompt-lengths", "8,16", "--new-tokens", "4", "--repeats", "2", "--warmup", "1"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True,
                          timeout=timeout)


# ---- profiles ------------------------------------------------------------------------------------------------
def test_builtin_profiles():
    names = profiles.available()
    assert {"cpu", "rpi5", "rpi4", "jetson-orin-nano", "jetson-agx-orin"} <= set(names)
    for name in names:
        p = profiles.load(name)
        assert p.name == name and p.formats and p.python and p.remote_dir
        assert p.preferred_format in p.formats
    rpi5 = profiles.load("rpi5")
    assert rpi5.threads == 4 and rpi5.memory_budget_mb == 6144 and rpi5.onnx_providers == ["CPUExecutionProvider"]
    assert rpi5.ssh.connect_timeout > 0 and rpi5.ssh.host is None
    nano = profiles.load("jetson-orin-nano")
    assert nano.n_gpu_layers == -1 and "CUDAExecutionProvider" in nano.onnx_providers
    assert "TensorrtExecutionProvider" in nano.onnx_providers
    args = nano.profiler_args("gguf")
    assert "--n-gpu-layers=-1" in args and args[args.index("--memory-budget") + 1] == "5120"
    assert "--providers" in nano.profiler_args("onnx")
    over = rpi5.profiler_args("gguf", threads=1, prompt_lengths=[8], memory_budget_mb=None)
    assert over[over.index("--threads") + 1] == "1" and over[over.index("--prompt-lengths") + 1] == "8"


USER_PROFILE = """
name = "{name}"
description = "a board of my own"
threads = 2
memory_budget_mb = 900
[runtimes.onnx]
providers = ["XnnpackExecutionProvider", "CPUExecutionProvider"]
[remote]
python = "/opt/venv/bin/python"
[ssh]
host = "me@board.local"
port = 2222
"""


def test_user_profiles_without_code(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "myboard.toml").write_text(USER_PROFILE.format(name="myboard"))
    (mine / "rpi5.toml").write_text(USER_PROFILE.format(name="rpi5"))  # overrides the shipped rpi5
    monkeypatch.setenv("EDGEPRUNE_DEVICES", str(mine))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    p = profiles.load("myboard")
    assert (p.threads, p.memory_budget_mb, p.python, p.ssh.host, p.ssh.port) == (2, 900, "/opt/venv/bin/python",
                                                                                  "me@board.local", 2222)
    assert profiles.load("rpi5").memory_budget_mb == 900
    # the XDG config directory is searched too
    monkeypatch.delenv("EDGEPRUNE_DEVICES")
    xdg = tmp_path / "xdg" / "edgeprune" / "devices"
    xdg.mkdir(parents=True)
    (xdg / "other.toml").write_text(USER_PROFILE.format(name="other"))
    assert profiles.load("other").threads == 2
    assert profiles.load("rpi5").memory_budget_mb == 6144
    # a file path, with --profile-file or as --device
    assert profiles.load(None, profile_file=mine / "myboard.toml").name == "myboard"
    assert profiles.load(str(mine / "myboard.toml")).name == "myboard"
    p = cli("devices", "--json", str(tmp_path / "d.json"))
    assert p.returncode == 0 and "rpi5" in p.stdout


@pytest.mark.parametrize("text,needle", [
    ("threds = 4", "unknown key 'threds'"),
    ("[ssh]\nhostname = 'x'", "unknown key 'ssh.hostname'"),
    ("threads = 0", "threads must be an integer >= 1"),
    ("memory_budget_mb = -1", "memory_budget_mb must be a positive number"),
    ("formats = ['tflite']", "formats must be a list"),
    ("threads = [", "not valid TOML"),
    ("name = 'other'", "is named 'other'"),
])
def test_profile_errors(tmp_path, monkeypatch, text, needle):
    (tmp_path / "bad.toml").write_text(text)
    monkeypatch.setenv("EDGEPRUNE_DEVICES", str(tmp_path))
    with pytest.raises(EdgePruneError, match=re.escape(needle)):
        profiles.load("bad")


def test_unknown_device_lists_known(tmp_path):
    p = cli("profile", str(tmp_path), "--device", "toaster")
    assert p.returncode == 2 and "unknown device 'toaster'" in p.stderr and "rpi5" in p.stderr
    assert "Traceback" not in p.stderr


# ---- profiler -------------------------------------------------------------------------------------------------
def test_gguf_metadata_without_gguf_package(artifacts):
    from edgeprune.devices.llama_generate import gguf_metadata
    from gguf import GGUFReader

    meta = gguf_metadata(artifacts["gguf"] / "model.gguf")
    reader = GGUFReader(artifacts["gguf"] / "model.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == reader.fields["llama.block_count"].contents()
    assert meta["llama.attention.head_count_kv"] == 2 and meta["general.file_type"] == 0
    shape = profiler.model_shape(artifacts["gguf"])
    assert shape["kv_heads"] == [2, 2, 2] and shape["head_dim"] == 16 and shape["vocab"] == 259
    assert profiler.model_shape(artifacts["onnx"])["kv_heads"] == [2, 2, 2]


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_profile_document(artifacts, fmt):
    doc = profiler.profile(artifacts[fmt], device="cpu", threads=1, prompt_lengths=[16, 8, 4096], new_tokens=6,
                           warmup=1, repeats=3, memory_budget_mb="auto", quiet=True)
    assert doc["schema"] == "edgeprune.profile/1" and doc["device"] == "cpu"
    a = doc["artifact"]
    assert a["format"] == fmt and a["dtype"] in ("fp32", "f32") and a["size_bytes"] > a["model_bytes"] > 0
    assert a["manifest_sha256"] == bundle.sha256_file(artifacts[fmt] / "manifest.json")
    assert doc["settings"]["prompt_lengths"] == [8, 16] and doc["settings"]["skipped_prompt_lengths"] == [4096]
    assert [r["prompt_tokens"] for r in doc["prefill"]] == [8, 16]
    for row in doc["prefill"]:
        assert len(row["prefill_ms_all"]) == 3 and 0 < row["prefill_ms"] <= row["ttft_ms"]
    d = doc["decode"]
    assert d["steps_measured"] == 18 and d["tokens_per_s"] > 0 and d["ms_per_token_p95"] >= d["ms_per_token_p50"] > 0
    assert doc["load_s"] > 0 and doc["memory"]["peak_rss_mb"] >= doc["memory"]["rss_after_load_mb"] > 0
    assert doc["memory_check"]["fits"] and doc["memory_check"]["budget_mb"] > 0
    m = doc["machine"]
    assert m["logical_cores"] >= 1 and m["memory_total_mb"] > 0 and m["os"] and m["python"]
    r = doc["runtime"]
    assert r["name"] == ("llama.cpp" if fmt == "gguf" else "onnxruntime")
    assert r["execution_provider"] in ("llama.cpp CPU", "CPUExecutionProvider") and r["versions"]["numpy"]
    json.dumps(doc)  # plain JSON


def test_onnx_backend_keeps_no_prompt_logits(artifacts):
    """Between runs the onnxruntime backend holds the next token's row only: a [prompt, vocab] array kept across
    the next run was a second copy at the peak (+96 MiB per 512-token prefill of SmolLM2)."""
    from edgeprune.devices import timing

    backend = timing.OrtBackend(artifacts["onnx"] / "model.onnx", threads=1, providers=None)
    backend.prefill(list(range(3, 40)))
    assert backend._logits.ndim == 1 and backend._logits.base is None  # a copy, not a view of the full logits
    first = backend.first_token()
    assert 0 <= backend.step(first) < backend._logits.size
    assert backend._logits.ndim == 1


@pytest.mark.parametrize("dtype, per_weight", [("int8", 1.125), ("fp16", 2), ("fp32", 4)])
def test_memory_estimate_counts_a_shared_table_as_two(dtype, per_weight):
    """An ONNX file whose tied head shares the embedding's table is smaller by one table; onnxruntime holds about
    what it held for the two-table file (it folds the Transpose; int8: it prepacks the head's copy), so the
    estimate is the same."""
    shape = {"kv_heads": [3] * 30, "head_dim": 64, "hidden": 576, "heads": 9, "vocab": 49152}
    table = 49152 * 576 * per_weight
    two = profiler.estimate_memory_for("onnx", 180e6, shape, 512, 512, dtype)
    one = profiler.estimate_memory_for("onnx", 180e6 - table, {**shape, "shared_head": True}, 512, 512, dtype)
    assert one["expected_mb"] == pytest.approx(two["expected_mb"], abs=0.2)


def test_memory_budget_refusal(artifacts, tmp_path):
    start = time.perf_counter()
    p = cli("profile", str(artifacts["onnx"]), "--device", "cpu", "--memory-budget", "20", "--json",
            str(tmp_path / "p.json"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "does not fit" in p.stderr and "memory budget of 20 MiB" in p.stderr
    assert "loaded" not in p.stderr and not (tmp_path / "p.json").exists()  # refused before loading
    assert time.perf_counter() - start < 60
    est = profiler.estimate_memory(artifacts["gguf"], 256, 16)
    bigger = profiler.estimate_memory(artifacts["gguf"], 4096, 512)
    assert bigger["parts_mb"]["kv_cache"] > est["parts_mb"]["kv_cache"] and bigger["estimate_mb"] > est["estimate_mb"]
    # a device profile's budget is the default
    (tmp_path / "tiny.toml").write_text('memory_budget_mb = 30\n')
    p = cli("profile", str(artifacts["gguf"]), "--profile-file", str(tmp_path / "tiny.toml"))
    assert p.returncode == 2 and "device 'tiny' has a memory budget of 30 MiB" in p.stderr


def test_cli_profile(artifacts, tmp_path):
    p = cli("profile", str(artifacts["gguf"]), "--device", "rpi5", *QUICK, "--json", str(tmp_path / "p.json"))
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["device"] == "rpi5" and doc["memory_check"]["budget_mb"] == 6144
    assert doc["runtime"]["threads"] == 1 and doc["settings"]["repeats"] == 2
    assert "decode after" in p.stdout and "TTFT" in p.stdout
    p = cli("profile", str(tmp_path), "--device", "cpu")
    assert p.returncode == 2 and "not an artifact directory" in p.stderr


BLOCKER = textwrap.dedent("""
    import runpy, sys
    BLOCKED = {"torch", "transformers", "edgeprune", "safetensors", "gguf", "typer", "rich", "accelerate"}
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the device side must not import it")
            return None
    sys.meta_path.insert(0, Blocker())
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        leaked = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
        print("LEAKED" if leaked else "CLEAN", leaked, file=sys.stderr)
""")


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_plain_script_profiler_is_torch_free(artifacts, tmp_path, fmt):
    """The profiler copied alone with its sibling device modules runs with torch, transformers and edgeprune
    itself unimportable (what a device with only the device-side requirements has)."""
    code = tmp_path / "edgeprune_device"
    code.mkdir()
    from edgeprune.devices.ship import CODE_FILES

    for name in CODE_FILES:
        shutil.copy2(DEVICES / name, code / name)
    p = subprocess.run([sys.executable, "-B", "-c", BLOCKER, str(code / "profiler.py"), str(artifacts[fmt]),
                        *QUICK, "--memory-budget", "auto", "--json", str(tmp_path / "out.json")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "CLEAN []" in p.stderr
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["artifact"]["format"] == fmt and doc["decode"]["tokens_per_s"] > 0
    assert "torch" not in doc["runtime"]["versions"]


def test_python_m_profiler(artifacts):
    p = subprocess.run([sys.executable, "-m", "edgeprune.devices.profiler", str(artifacts["onnx"]), *QUICK,
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["runtime"]["name"] == "onnxruntime"
    p = subprocess.run([sys.executable, "-m", "edgeprune.devices.profiler", str(artifacts["onnx"]), "--check-only",
                        "--memory-budget", "100000"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and json.loads(p.stdout)["fits"] is True


# ---- bundles ------------------------------------------------------------------------------------------------
def test_bundle_agent_marks_complete_only_after_verification(artifacts, tmp_path):
    src = artifacts["gguf"]
    sources = {f"artifact/{f.name}": f for f in src.iterdir()}
    sources["edgeprune_device/bundle.py"] = DEVICES / "bundle.py"
    m = bundle.build_manifest("tiny", sources, {"artifact": "tiny"})
    staging, final = str(tmp_path / "b.partial"), str(tmp_path / "b")
    params = {"id": m["id"], "staging": staging, "final": final, "files": m["files"], "modules": ["numpy"]}
    st = bundle.op_status(params)
    assert st["complete"] is False and st["have"] == [] and st["modules"]["numpy"]["found"]
    assert Path(staging, "artifact").is_dir()
    Path(staging, "bundle.json").write_text(json.dumps(m))
    for rel, f in sources.items():
        shutil.copy2(f, Path(staging, rel))
    model = Path(staging, "artifact", "model.gguf")
    model.write_bytes(model.read_bytes()[:1000])  # an interrupted upload
    st = bundle.op_status(params)
    assert "artifact/model.gguf" not in st["have"] and "artifact/tokenizer.json" in st["have"]
    r = bundle.op_finalize(params)
    assert not r["ok"] and r["bad"] == ["artifact/model.gguf"]
    assert not Path(final).exists() and not Path(staging, bundle.COMPLETE).exists()
    shutil.copy2(src / "model.gguf", model)
    assert bundle.op_finalize(params)["ok"]
    assert Path(final, bundle.COMPLETE).is_file() and not Path(staging).exists()
    assert bundle.op_status(params)["complete"] is True
    p = subprocess.run([sys.executable, str(DEVICES / "bundle.py"), "verify", final], capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout)["complete"] is True
    # a file changed on the device: recheck turns the bundle back into a staging directory
    Path(final, "artifact", "tokenizer.json").write_text("{}")
    p = subprocess.run([sys.executable, str(DEVICES / "bundle.py"), "verify", final], capture_output=True, text=True)
    assert p.returncode == 3 and json.loads(p.stdout)["bad"] == ["artifact/tokenizer.json"]
    r = bundle.op_recheck(params)
    assert not r["ok"] and not Path(final).exists() and Path(staging).is_dir()
    assert not Path(staging, bundle.COMPLETE).exists()


@pytest.mark.parametrize("args,needle", [
    (["--device", "rpi5"], "no SSH host for device 'rpi5'"),
    (["--device", "rpi5", "--host=-oProxyCommand=touch /tmp/x"], "invalid SSH host"),
    (["--device", "rpi5", "--host", "pi@h", "--remote-dir", "a b"], "remote directory 'a b'"),
    (["--device", "rpi5", "--host", "pi@h", "--remote-dir", "x/../../etc"], "no .."),
    (["--device", "rpi5", "--host", "pi@h", "--python", "python3; rm -rf /"], "invalid remote python"),
    (["--device", "rpi5", "--host", "pi@h", "--key", "/nonexistent/key"], "SSH key not found"),
    (["--device", "rpi4", "--host", "pi@h", "--memory-budget", "10"], "does not fit"),
])
def test_ship_rejects_before_connecting(artifacts, args, needle):
    start = time.perf_counter()
    p = cli("ship", str(artifacts["gguf"]), *args)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "connecting" not in p.stderr and time.perf_counter() - start < 60


def test_emulation_detection_and_report_label(monkeypatch):
    from edgeprune.devices import emulation, remote

    from edgeprune.report import _measured_on_notes

    here = emulation.detect()
    assert here["emulated"] is False and here["evidence"] == []  # this host runs natively
    # an aarch64 process that sees an x86 kernel's cpuinfo is emulated, whatever the environment says
    monkeypatch.setattr(emulation.platform, "machine", lambda: "aarch64")
    monkeypatch.setenv("EDGEPRUNE_EMULATOR", "")
    got = emulation.detect()
    assert got["emulated"] and got["marker"] is None
    assert {e.split(":")[0] for e in got["evidence"]} == {"kernel", "cpuinfo"}  # x86_64 kernel, x86 cpuinfo
    assert emulation._cpuinfo_arch("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd\n"
                                   "CPU implementer\t: 0x41\nCPU architecture: 8\n") == "arm"
    doc = {"device": "rpi5", "arch": "aarch64", "emulated": True, "ship": {"host": "pi@127.0.0.1:2222"},
           "machine": {"arch": "aarch64", "cpu_model": "AMD EPYC", "board": None}}
    m = remote.measured_on(doc)
    assert m == {"host": "pi@127.0.0.1:2222", "arch": "aarch64", "emulated": True, "cpu_model": "AMD EPYC",
                 "board": None, "device_profile": "rpi5"}
    notes = _measured_on_notes([{"variant": "pruned", "format": "gguf", "dtype": "q8_0", "measured_on": m},
                                {"variant": "pruned", "format": "onnx", "dtype": "int8",
                                 "measured_on": {**m, "host": None, "arch": "x86_64", "emulated": False}}])
    assert len(notes) == 2 and "EMULATED" in notes[0] and "not device timings" in notes[0]
    assert "pruned gguf q8_0" in notes[0] and "this host (x86_64" in notes[1] and "EMULATED" not in notes[1]


def _cuda_reason() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("no CUDA here (onnxruntime has no CUDAExecutionProvider): the Jetson path (CUDA/TensorRT providers, "
                "llama.cpp CUDA with n_gpu_layers) is not verified in this environment")
    return None


@pytest.mark.skipif(_cuda_reason() is not None, reason=_cuda_reason() or "")
def test_jetson_profile_uses_cuda(artifacts):
    """Where a GPU and CUDA builds are installed: the Jetson profile's provider list selects CUDA (TensorRT first
    when present) and llama.cpp offloads every layer."""
    import llama_cpp

    prof = profiles.load("jetson-orin-nano")
    doc = profiler.profile(artifacts["onnx"], device=prof.name, providers=prof.onnx_providers, threads=1,
                           prompt_lengths=[8], new_tokens=4, warmup=0, repeats=1, quiet=True)
    assert doc["runtime"]["execution_provider"] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    if llama_cpp.llama_supports_gpu_offload():
        doc = profiler.profile(artifacts["gguf"], device=prof.name, n_gpu_layers=prof.n_gpu_layers, threads=1,
                               prompt_lengths=[8], new_tokens=4, warmup=0, repeats=1, quiet=True)
        assert doc["runtime"]["execution_provider"] == "llama.cpp GPU" and doc["runtime"]["n_gpu_layers"] == -1
