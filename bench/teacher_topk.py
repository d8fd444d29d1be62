"""Distillation cost and the top-k teacher targets, on the default model pruned 20% (one round, no refit).

    .venv/bin/python bench/teacher_topk.py [--data DIR] [--steps 6] [--windows 16]

1. How much of the teacher's distribution the top-k keeps, per k: the mean top-k mass, the truncated KL as a
   share of the full KL, and the cosine between the gradients (w.r.t. the student's logits) of the truncated and
   the full KL, on ``--windows`` recovery windows of 128 tokens.
2. Seconds per distillation step (4 windows x 128 tokens), interleaved so the machine's load hits every variant
   alike: the old loop (a resident teacher's forward pass every step, full-vocabulary KL), stored top-64 targets,
   and stored targets with bfloat16 autocast; plus the streamed teacher pass per window, with and without
   autocast. The first step of each variant is a warm-up and not counted.
Writes bench/results/teacher_topk.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

from common import DEFAULT_DATA, data_dir, save


def coverage(teacher, student, windows, ks) -> list[dict]:
    """Per k, over ``windows`` in chunks of 4 (bounded memory): top-k mass, KL shares, gradient cosine."""
    import torch

    from edgeprune.recover import distillation_loss
    from edgeprune.teacher import _rest_logmass, topk_kl

    sums = {k: dict(mass=0.0, trunc=0.0, full=0.0, dot=0.0, nt=0.0, nf=0.0) for k in ks}
    chunks = 0
    for i in range(0, len(windows), 4):
        x = windows[i:i + 4]
        with torch.no_grad():
            t, s0 = teacher(x).logits.float(), student(x).logits.float()
        s = s0.requires_grad_(True)
        full = distillation_loss(s, t)
        (g_full,) = torch.autograd.grad(full, s)
        logp = torch.log_softmax(t, -1)
        for k in ks:
            idx = t.topk(k, -1).indices
            lp, rest = logp.gather(-1, idx), _rest_logmass(t, idx)
            trunc = topk_kl(s, idx, lp, rest)
            (g,) = torch.autograd.grad(trunc, s)
            a = sums[k]
            a["mass"] += float(1 - rest.exp().mean())
            a["trunc"] += float(trunc.detach())
            a["full"] += float(full)
            a["dot"] += float((g * g_full).sum())
            a["nt"] += float((g * g).sum())
            a["nf"] += float((g_full * g_full).sum())
        chunks += 1
        del t, s0, s, g_full, logp
    n_pos = windows.shape[1]
    return [{"k": k, "top_k_mass": a["mass"] / chunks, "kl_share": a["trunc"] / a["full"],
             "grad_cosine": a["dot"] / (a["nt"] * a["nf"]) ** 0.5, "full_kl": a["full"] / chunks,
             "mib_per_1k_windows_of_128": (n_pos * k * 8 + n_pos * 4) * 1000 / 2**20} for k, a in sums.items()]


def step_times(teacher, student, windows, steps: int) -> dict:
    import torch

    from edgeprune.recover import _trainable, distillation_loss
    from edgeprune.teacher import teacher_targets, topk_kl

    tg = teacher_targets(teacher, windows[:4 * steps], k=64, progress=False)
    params = _trainable(student)
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: every variant times the same model
    student.train()
    times = {"resident teacher, full KL": [], "stored top-64": [], "stored top-64 + bf16 autocast": []}
    for step in range(steps):
        x = windows[step * 4:(step + 1) * 4]
        for name in times:
            t0 = time.perf_counter()
            if name.startswith("resident"):
                with torch.no_grad():
                    target = teacher(x).logits
                loss = distillation_loss(student(x).logits, target)
            else:
                amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.endswith("autocast"))
                with amp:
                    logits = student(x).logits
                loss = topk_kl(logits, *tg.rows(step * 4, step * 4 + 4))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - t0)
    student.eval()
    out = {k: statistics.median(v) for k, v in times.items()}
    for amp in (False, True):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            teacher_targets(teacher, windows[:16], k=64, progress=False)
        out[f"teacher pass per window{' (bf16 autocast)' if amp else ''}"] = (time.perf_counter() - t0) / 16
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    data = data_dir(args.data)
    import torch

    from edgeprune.data import calibration_batches, load_text
    from edgeprune.models import load
    from edgeprune.prune import PruneConfig, prune_model

    torch.set_grad_enabled(True)
    lm = load("default")
    calib = load_text(str(data / "wikitext-2" / "tokens" / "valid.txt"), "calib")
    teacher = copy.deepcopy(lm.model).eval()
    prune_model(lm, PruneConfig(0.2, scorer="piem", allocator="lsps", sensitivity="bi", round_to=32,
                                n_samples=32), calib, progress=False)
    windows = calibration_batches(lm.tokenizer, calib, max(args.windows, 4 * args.steps), 128, seed=1)
    load0 = os.getloadavg()[0]
    print(f"pruned; load average {load0:.2f}", flush=True)
    cov = coverage(teacher, lm.model.eval(), windows[:args.windows], (8, 16, 32, 64, 128, 256, 1024))
    print(cov, flush=True)
    times = step_times(teacher, lm.model, windows, args.steps)
    print(f"default model pruned 20% (one round); {args.windows} windows x 128 tokens; load average "
          f"{load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| k | teacher mass in top-k | truncated KL / full KL | gradient cosine | MiB per 1,000 windows |")
    print("|---|---|---|---|---|")
    for r in cov:
        print(f"| {r['k']} | {r['top_k_mass']:.3f} | {r['kl_share']:.3f} | {r['grad_cosine']:.4f} | "
              f"{r['mib_per_1k_windows_of_128']:.0f} |")
    print(f"full KL of the pruned model: {cov[0]['full_kl']:.3f}")
    print("| variant | seconds |")
    print("|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v:.2f} |")
    save("teacher_topk", {"coverage": cov, "seconds": times, "loadavg": [load0, os.getloadavg()[0]]})


if __name__ == "__main__":
    main()
