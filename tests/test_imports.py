import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_import_edgeprune_is_cheap():
    mods = _modules_after("import edgeprune, edgeprune.cli")
    assert "torch" not in mods and "transformers" not in mods


def test_device_side_imports_without_torch():
    mods = _modules_after("import edgeprune.devices, edgeprune.export")
    assert "torch" not in mods and "transformers" not in mods


def test_device_modules_import_without_torch():
    # the device side (profiler, runtimes, bundle agent) and the host side of devices (profiles, ship)
    mods = _modules_after("import edgeprune.devices.profiler, edgeprune.devices.artifact_info, "
                          "edgeprune.devices.memory_check, edgeprune.devices.machine, edgeprune.devices.timing, "
                          "edgeprune.devices.ort_generate, "
                          "edgeprune.devices.llama_generate, edgeprune.devices.bundle, "
                          "edgeprune.devices.profiles, edgeprune.devices.ship, edgeprune.devices.emulation, "
                          "edgeprune.devices.greedy, edgeprune.devices.sim, edgeprune.devices.provision, "
                          "edgeprune.devices.remote")
    assert "torch" not in mods and "transformers" not in mods


def test_one_namespace():
    import edgeprune.devices
    import edgeprune.export

    assert edgeprune.devices.__file__.replace("\\", "/").endswith("devices/__init__.py")
    assert edgeprune.export.__file__.replace("\\", "/").endswith("export/__init__.py")
