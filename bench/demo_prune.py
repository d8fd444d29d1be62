"""The demo's prune stage (edgeprune/configs/demo.toml's [prune] section: 20% PIEM + LSPS with bi sensitivity,
two rounds, refit, 100 distillation steps) run by one or more edgeprune installs back to back, with the pruned
model's PPL on the demo's evaluation tokens (WikiText-2 test, seq 128, first 8,192 tokens).

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/demo_prune.py --checkout /tmp/before --checkout .

Each checkout runs `python -m edgeprune prune` and `eval` under `nice` with this interpreter in the checkout's
directory (`-m` puts the current directory first on sys.path, so its edgeprune package is the one imported;
edgeprune.export and edgeprune.devices still come from the installed tree, which the prune stage does not use); the table gives the stage's wall time, the
distillation's seconds per step, the peak RSS the prune record states, the PPL and the load average before and
after (the machine is shared: compare rows of one run only). Writes bench/results/demo_prune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, data_dir, save

PRUNE = ["--ratio", "0.2", "--scorer", "piem", "--allocator", "lsps", "--sensitivity", "bi", "--round-to", "32",
         "--rounds", "2", "--reconstruct", "--recover-steps", "100", "--n-samples", "64", "--calib-seq-len", "128",
         "--seed", "0"]


def _commit(root: str) -> str:
    head = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h"], capture_output=True, text=True)
    return f"{root}@{head.stdout.strip() or '?'}"


def one(root: str, data: Path, work: Path) -> dict:
    python = sys.executable
    out, rec, ev = work / "pruned", work / "prune.json", work / "eval.json"
    code = "import edgeprune; print(edgeprune.__file__)"
    imported = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    if not imported.startswith(str(Path(root).resolve())):
        sys.exit(f"error: in {root} python imports {imported.strip()}")
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(["nice", "-n", "5", python, "-m", "edgeprune", "prune", "default", *PRUNE, "--calib",
                    str(data / "wikitext-2" / "tokens" / "valid.txt"), "--output", str(out), "--json", str(rec)],
                   check=True, capture_output=True, cwd=root)
    wall = time.perf_counter() - start
    subprocess.run(["nice", "-n", "5", python, "-m", "edgeprune", "eval", str(out), "--data",
                    str(data / "wikitext-2" / "wiki.test.raw"), "--seq-len", "128", "--max-tokens", "8192",
                    "--json", str(ev)], check=True, capture_output=True, cwd=root)
    r = json.loads(rec.read_text())
    r = r.get("record", r)
    recovery = r.get("recovery") or {}
    e = json.loads(ev.read_text())
    ppl = e.get("ppl", e).get("ppl") if isinstance(e.get("ppl", e), dict) else e.get("ppl")
    return {"install": _commit(root), "wall_seconds": wall, "prune_record_seconds": r.get("seconds"),
            "distill_seconds": recovery.get("seconds"),
            "seconds_per_step": recovery["seconds"] / recovery["config"]["steps"] if recovery else None,
            "kl_curve": recovery.get("kl_curve"), "peak_rss_mib": r.get("peak_rss_mib"), "ppl": ppl,
            "loadavg": [load0, os.getloadavg()[0]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", action="append", required=True, help="an edgeprune checkout (repeatable)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    args = ap.parse_args()
    data = data_dir(args.data).resolve()
    rows = []
    for root in args.checkout:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(one(str(Path(root).resolve()), data, Path(tmp)))
        print(json.dumps(rows[-1]), flush=True)
    print("| install | prune stage s | distillation s/step | peak RSS MiB | PPL | load avg before -> after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        sps = f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "–"
        print(f"| {r['install']} | {r['wall_seconds']:.0f} | {sps} | {r['peak_rss_mib']:.0f} | {r['ppl']:.2f} | "
              f"{r['loadavg'][0]:.1f} -> {r['loadavg'][1]:.1f} |")
    save("demo_prune", {"rows": rows})


if __name__ == "__main__":
    main()
