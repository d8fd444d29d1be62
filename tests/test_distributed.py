"""Data-parallel distillation through accelerate on CPUs (gloo): the same loss curve and weights as one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from edgeprune.devices.local_sshd import free_port

from edgeprune.checkpoint import save_checkpoint
from edgeprune.distill import _args, run
from edgeprune.models import load
from edgeprune.models.tiny import build_tiny
from edgeprune.plan import LayerPlan, PruningPlan
from edgeprune.surgery import apply_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(tmp_path):
    dense = save_checkpoint(build_tiny("llama"), tmp_path / "dense", {})
    lm = build_tiny("llama")
    apply_plan(lm.adapter, PruningPlan([LayerPlan(i, [0, 1, 2], [0], list(range(0, 128, 2))) for i in range(3)]))
    return dense, save_checkpoint(lm, tmp_path / "pruned", {})


@pytest.mark.slow  # two launched processes import torch and transformers: ~30-60 s on 2 shared cores
def test_two_processes_match_one(tmp_path):
    dense, pruned = _pair(tmp_path)
    common = [str(pruned), "--teacher", str(dense), "--steps", "6", "--batch", "4", "--seq-len", "32",
              "--lr", "0.04", "--top-k", "32", "--autocast", "off"]  # float32: equal up to summation order
    one = run(_args(common + ["-o", str(tmp_path / "one")]))
    assert one["processes"] == 1
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "edgeprune.distill", *common, "-o", str(tmp_path / "two"),
           "--json", str(tmp_path / "two.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2
    assert two["kl_steps"] == pytest.approx(one["kl_steps"], rel=1e-4, abs=1e-6)
    assert two["kl_steps"][-1] < two["kl_steps"][0]
    a, b = load(str(tmp_path / "one")).model.state_dict(), load(str(tmp_path / "two")).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["recovery_run"]["processes"] == 2 and manifest["distilled_from"] == str(pruned)


def test_entry_point_errors_are_one_line(tmp_path, capsys):
    from edgeprune.distill import main

    dense, pruned = _pair(tmp_path)
    assert main([str(pruned), "--teacher", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main([str(pruned), "--teacher", str(dense), "--steps", "0", "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
