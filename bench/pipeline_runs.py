"""Whole-pipeline runs of a model (`edgeprune run`) as benchmark rows: each named run goes through every stage
(evaluation, pruning, ONNX/GGUF export, the artifacts' PPL in their runtimes, device profiles) and its collected
report data is kept in bench/results/pipeline_runs.json, from which bench/report.py renders one results table per
run into BENCHMARKS.md.

    python bench/pipeline_runs.py                         # every run below (its run directory resumes)
    python bench/pipeline_runs.py --only gemma3-270m-uniform
    python bench/pipeline_runs.py --collect               # only re-read the run directories

Runs live in out/pipeline/NAME (content-keyed stages: a rerun recomputes nothing that is done; runs of one model
share nothing on disk). Profiles use the run config's device profile on this host; the load average at the start
and end of each profile is recorded, since this machine is shared.
Not here: what a stage does (edgeprune/pipeline/), or the ablation grid (ablate.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from common import ROOT, data_dir, load_result, save

# name -> (model, `edgeprune run --set` overrides). No distillation: CPU time (it is the demo's job on SmolLM2).
RUNS = {
    "gemma3-270m": ("gemma3-270m", ["prune.recover_steps=0"]),
    # uniform widths without the refit's output biases: what llama.cpp's gemma3 architecture can hold
    "gemma3-270m-uniform": ("gemma3-270m", ["prune.recover_steps=0", "prune.allocator=uniform",
                                            "prune.reconstruct=false"]),
}


def command(name: str) -> list[str]:
    model, sets = RUNS[name]
    return ["edgeprune", "run", "--model", model, "--out", f"out/pipeline/{name}",
            *[x for s in sets for x in ("--set", s)]]


def profile_loads(run_dir) -> dict:
    """The load average (1 min) at the start and end of each profile: how shared the 2 cores were."""
    import json

    out = {}
    for f in sorted(run_dir.glob("stages/profile-*/profile.json")):
        m = json.loads(f.read_text()).get("machine") or {}
        if m.get("load_avg"):
            out[f.parent.name.removeprefix("profile-")] = [m["load_avg"][0], (m.get("load_avg_end") or [None])[0]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--only", help="comma-separated run names (default: all)")
    ap.add_argument("--collect", action="store_true", help="do not run; re-read the run directories")
    args = ap.parse_args()
    os.environ["EDGEPRUNE_DATA"] = str(data_dir(args.data))
    from edgeprune.report_data import collect

    names = args.only.split(",") if args.only else list(RUNS)
    for n in names:
        if n not in RUNS:
            sys.exit(f"error: unknown run {n!r}; known: {', '.join(RUNS)}")
    result = load_result("pipeline_runs") or {"runs": {}}
    for name in names:
        cmd = command(name)
        if not args.collect:
            rc = subprocess.run([sys.executable, "-m", "edgeprune", *cmd[1:]], cwd=ROOT).returncode
            if rc != 0:
                print(f"{name}: `{' '.join(cmd)}` failed (exit {rc}); the run directory resumes next time")
                continue
        run_dir = ROOT / "out" / "pipeline" / name
        data = collect(run_dir)
        data["run_dir"] = f"out/pipeline/{name}"
        result["runs"][name] = {"command": " ".join(cmd), "profile_load": profile_loads(run_dir), "report": data}
        save("pipeline_runs", result)
        print(f"{name}: collected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
