"""Distil a pruned checkpoint towards its unpruned model, in one process or data-parallel across processes.

    python -m edgeprune.distill PRUNED_DIR --teacher MODEL --calib TEXT --steps 100 -o OUT
    accelerate launch --multi_gpu --num_processes 2 -m edgeprune.distill PRUNED_DIR ...   # also on CPUs (gloo)
    torchrun --nproc_per_node 2 -m edgeprune.distill PRUNED_DIR ...

The same recovery as ``edgeprune prune --recover-steps`` (edgeprune.recover), for a checkpoint pruned without
it: the teacher's top-k distributions on the recovery windows are computed once and the teacher is freed before
the student is loaded; then every process trains on its share of each step's windows. The first process writes
the distilled checkpoint (OUT, with the recovery record in its manifest) and ``--json``. Every process computes
the teacher targets for all windows (simple and deterministic; it repeats that pass per process).

On accelerate 1.16 ``accelerate launch --cpu --num_processes N`` starts one process unless MPI is set up
(``--mpirun_hostfile``); ``--multi_gpu`` starts N processes through torch's launcher also on a machine without
GPUs, and the loop then uses gloo.
"""

from __future__ import annotations

import argparse
import gc
import sys

from edgeprune.errors import EdgePruneError


def _args(argv):
    from edgeprune.recover import RecoveryConfig

    d = RecoveryConfig()
    ap = argparse.ArgumentParser(prog="python -m edgeprune.distill", description=__doc__.splitlines()[0])
    ap.add_argument("student", help="the pruned checkpoint directory")
    ap.add_argument("--teacher", required=True, help="the unpruned model (a model spec, e.g. default)")
    ap.add_argument("--calib", default="builtin", help="recovery text (a text spec)")
    ap.add_argument("-o", "--output", required=True, help="the distilled checkpoint directory")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=d.batch_size, help="windows per step, over all processes")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate relative to each weight's RMS")
    ap.add_argument("--top-k", type=int, default=d.top_k)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--autocast", default=d.autocast, help="bfloat16 autocast of the teacher pass and the steps: "
                    "auto (where the device computes bf16 natively) | on | off")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (each process's own GPU when launched)")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (the saved checkpoint's)")
    ap.add_argument("--json", help="write the recovery record here")
    return ap.parse_args(argv)


def run(args) -> dict:
    from edgeprune.checkpoint import save_checkpoint
    from edgeprune.data import calibration_batches, load_text
    from edgeprune.io import write_json
    from edgeprune.models import load
    from edgeprune.recover import RecoveryConfig, accelerator, distill
    from edgeprune.teacher import teacher_targets

    cfg = RecoveryConfig(args.steps, args.lr, args.batch, top_k=args.top_k, seed=args.seed, autocast=args.autocast)
    cfg.validate()
    if cfg.steps < 1:
        raise EdgePruneError("--steps must be at least 1")
    acc = accelerator()
    device = args.device
    if acc is not None and acc.device.type == "cuda":
        device = f"cuda:{acc.local_process_index}"
    teacher = load(args.teacher, device=device, dtype=args.dtype)
    windows = calibration_batches(teacher.tokenizer, load_text(args.calib, "calib"), cfg.steps * cfg.batch_size,
                                  args.seq_len, cfg.seed)
    main = acc is None or acc.is_main_process
    targets = teacher_targets(teacher.model, windows, cfg.top_k, cfg.temperature, progress=main,
                              autocast=cfg.use_autocast(device))
    vocab = teacher.model.get_output_embeddings().weight.shape[0]
    del teacher
    gc.collect()
    lm = load(args.student, device=device, dtype=args.dtype)
    if lm.model.get_output_embeddings().weight.shape[0] != vocab:
        raise EdgePruneError(f"{args.student} and {args.teacher} have different vocabularies")
    record = distill(lm.model, targets, windows, cfg, progress=main)
    record["teacher"] = args.teacher
    if main:
        fields = {k: v for k, v in lm.manifest.items() if k not in ("kind", "created", "command", "versions",
                                                                   "layout")}
        save_checkpoint(lm, args.output, {**fields, "distilled_from": args.student, "recovery_run": record})
        if args.json:
            write_json(args.json, record)
    if acc is not None:
        acc.wait_for_everyone()
    return record


def main(argv=None) -> int:
    args = _args(argv)
    try:
        record = run(args)
    except EdgePruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    curve = " ".join(f"{x:.3f}" for x in record["kl_curve"])
    print(f"distilled {record['config']['steps']} steps on {record['processes']} process(es); KL per 10 steps: "
          f"{curve}; {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
