"""The demo pipeline with its profile stages on the emulated aarch64 "rpi5" (README "Devices"): a functional check
that `edgeprune run` ships both artifact formats to an aarch64 device over real SSH and profiles them there. The
timings are qemu-user's, **not device timings**; the table says so on every row.

    python bench/device_run.py                          # out/device-run; README's device-run block
    python bench/device_run.py --set prune.recover_steps=0 --out out/device-run

What it does: finds the emulated device (`make device-sim` builds it), starts a private sshd on 127.0.0.1
(devices/local_sshd.py, as the SSH tests do: its own host key, an authorized key, a free port) unless --host is
given, runs
`edgeprune run demo --device rpi5 --set profile.host=... --set profile.python=<the device's python>` (plus --set
options), stops the sshd, and writes the run's profile table into README.md between the device-run markers.
Not here: building the device (devices/sim.py) or anything the pipeline does (edgeprune/pipeline/).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT

START, END = "<!-- device-run:start -->", "<!-- device-run:end -->"


def table(run_dir: Path, command: str) -> str:
    from edgeprune.report import machine_label, method_summary
    from edgeprune.report_data import collect

    data = collect(run_dir)
    p = (data.get("prune") or {}).get("config") or {}
    rows = ["| model | format | size (MiB) | TTFT (ms) | decode tok/s | peak RSS (MiB) | measured on | load avg |",
            "|---|---|---|---|---|---|---|---|"]
    ratio = p.get("ratio")
    for a in data["artifacts"]:
        prof = _profile_doc(run_dir, a)
        load = (prof.get("machine") or {}).get("load_avg")
        rows.append(f"| {'unpruned' if a['variant'] == 'baseline' else f'pruned {ratio:.0%}'} | "
                    f"{a['format'].upper()} {a['dtype']} | {a['size_bytes'] / 2**20:.1f} | {_f(a.get('ttft_ms'))} | "
                    f"{_f(a.get('decode_tokens_per_s'))} | {_f(a.get('peak_rss_mib'), 0)} | "
                    f"{machine_label(a.get('measured_on'))} | {' / '.join(f'{x:g}' for x in load or [])} |")
    m = (data["artifacts"][0].get("measured_on") or {}) if data["artifacts"] else {}
    prof_cfg = data["config"].get("profile", {})
    return "\n".join([
        f"<!-- written by `{command}`; do not edit by hand -->",
        f"`edgeprune run demo` ({method_summary(p)}, ratio {ratio:g}) with device profile "
        f"`{data.get('device')}` on {m.get('host')}: {m.get('arch')}, CPU `{m.get('cpu_model')}`, "
        f"**{'EMULATED (qemu-user on this x86-64 host): functional result, not device timings' if m.get('emulated') else 'native'}**. "
        f"TTFT at {prof_cfg.get('prompt_tokens')} prompt tokens, {prof_cfg.get('new_tokens')} decode steps, "
        f"{prof_cfg.get('repeats')} repeats, {prof_cfg.get('threads') or 'auto'} thread(s); load average = the "
        f"host's 1/5/15-min load at the start of each profile.", "", *rows, ""])


def _profile_doc(run_dir: Path, a: dict) -> dict:
    import json

    from edgeprune.rundir import StageId, stage_dir

    path = stage_dir(run_dir, StageId("profile", a["variant"], a["format"], a["dtype"]).name) / "profile.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _f(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    m = re.search(rf"^{re.escape(START)}[ \t]*\n(?:.*\n)*?{re.escape(END)}[ \t]*$", text, re.M)
    if m is None:
        sys.exit(f"error: {readme} has no '{START}' ... '{END}' block")
    readme.write_text(text[:m.start()] + f"{START}\n{block}{END}" + text[m.end():])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/device-run", help="the run directory")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="more `edgeprune run --set` options")
    ap.add_argument("--host", help="an sshd that reaches this machine (default: a private one is started)")
    ap.add_argument("--port", type=int)
    ap.add_argument("--key")
    ap.add_argument("--known-hosts")
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="'' = do not touch any README")
    args = ap.parse_args()
    from edgeprune.devices import local_sshd, sim

    device = sim.find()
    if device is None:
        sys.exit(f"error: {sim.unavailable_reason()}")
    out = Path(args.out).resolve()
    server = None
    with tempfile.TemporaryDirectory(prefix="edgeprune-sshd-") as tmp:
        if args.host:
            ssh = {"host": args.host, "port": args.port, "key": args.key, "known_hosts": args.known_hosts}
        else:
            try:
                server = local_sshd.start(Path(tmp))
            except local_sshd.SshdUnavailable as e:
                sys.exit(f"error: {e}")
            ssh = server.ssh_settings()
        sets = [f"profile.{k}={v}" for k, v in ssh.items() if v] + [
            f"profile.python={device.python}", f"profile.remote_dir={out}-device", *args.sets]
        cmd = [sys.executable, "-m", "edgeprune", "run", "demo", "--out", str(out), "--device", "rpi5",
               *[x for s in sets for x in ("--set", s)]]
        try:
            rc = subprocess.run(cmd).returncode
        finally:
            if server is not None:
                server.stop()
    if rc != 0:
        return rc
    if args.readme:
        shown = shlex.join(["python", "bench/device_run.py", *[x for s in args.sets for x in ("--set", s)]])
        update_readme(Path(args.readme), table(out, shown))
        print(f"updated the device-run block of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
