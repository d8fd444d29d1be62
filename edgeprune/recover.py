"""Recovery by knowledge distillation: a short fine-tune of the pruned model (the student) towards the unpruned
model (the teacher) on calibration text.

The loss is the KL divergence from the teacher's next-token distribution to the student's at every position
(Hinton et al.'s distillation at temperature ``temperature``; Sheared-LLaMA and Minitron recover pruned models the
same way). The teacher's distributions are computed once, before training, in one streamed inference pass and
kept as top-k log-probabilities plus the remaining mass (edgeprune.teacher): the teacher need not stay resident,
and the loss is the exact KL between the two distributions coarsened to the teacher's k tokens and "the rest". Distilling rather than fitting the text's own next tokens is deliberate: the target is the model the
user started from, so recovery restores what pruning removed and does not teach the student the calibration
text's domain (a plain language-model fine-tune on WikiText would also lower the *dense* model's WikiText PPL,
which makes a pruned-vs-dense comparison dishonest). ``ce_weight`` mixes in that next-token loss for users who
want it anyway.

Every decoder weight is trained (the model is small enough for a full fine-tune on a CPU; LoRA saves optimizer
memory, not the backward pass that dominates the time here) unless ``freeze_layers`` keeps the lowest layers
fixed; the token embedding, tied to the output head in SmolLM2, stays frozen, so the vocabulary matrix is neither
updated nor given optimizer state. A bfloat16/float16 student is trained in float32 (master weights; AdamW steps
are below bf16's resolution) and cast back after; ``autocast`` runs the teacher pass and the steps' matrix
products in bfloat16 where the device computes it natively (the loss and the optimizer stay float32).

Launched as several processes (``accelerate launch --multi_gpu --num_processes N`` or ``torchrun``; see
edgeprune.distill), the loop is data-parallel through ``accelerate.Accelerator``: each process takes an equal
share of every step's windows, gradients are averaged across processes (gloo on CPUs, NCCL on GPUs), so the
loss curve and the weights match one process's up to float summation order. Not done: FSDP/DeepSpeed sharding
(every process holds the whole student and its optimizer state).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from edgeprune.errors import EdgePruneError

AUTOCAST = ("auto", "on", "off")
# what ``lr`` means: "rms" = a step relative to each tensor's RMS (rms_lrs); "absolute" = one AdamW rate for every
# tensor, the rule before rms (recovery records without an ``lr_rule`` used it; kept to reproduce them)
LR_RULES = ("rms", "absolute")


@dataclass
class RecoveryConfig:
    steps: int = 0  # optimizer steps; 0 = no recovery
    # peak step size relative to each trained tensor's RMS (``rms_lrs``); linear warm-up over 5% of the steps,
    # then cosine decay to 0
    lr: float = 2e-3
    batch_size: int = 4  # windows per step
    temperature: float = 1.0
    ce_weight: float = 0.0  # share of the next-token cross-entropy in the loss (0 = pure distillation)
    seed: int = 1  # window sampling; differs from the scoring windows' seed by default
    top_k: int = 64  # teacher tokens kept per position (edgeprune.teacher; README "Scale" measures k)
    # bfloat16 autocast of the teacher pass and of the student's forward/backward (float32 master weights and
    # loss): "on", "off", or "auto" = where the device computes bf16 natively (placement.native_bf16)
    autocast: str = "auto"
    # the first N decoder layers stay frozen: no gradient reaches below layer N, which saves their share of the
    # backward pass (bench/recover_budget.py measures time and PPL)
    freeze_layers: int = 0
    lr_rule: str = "rms"

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise EdgePruneError("recovery steps must be >= 0 and its batch size >= 1")
        if not self.lr > 0 or not self.temperature > 0:
            raise EdgePruneError("recovery learning rate and temperature must be positive")
        if not 0 <= self.ce_weight <= 1:
            raise EdgePruneError("recovery ce_weight must be in [0, 1]")
        if self.top_k < 1:
            raise EdgePruneError("recovery top_k must be at least 1")
        if self.freeze_layers < 0:
            raise EdgePruneError("recovery freeze_layers must be >= 0")
        if self.lr_rule not in LR_RULES:
            raise EdgePruneError(f"recovery lr_rule must be one of {', '.join(LR_RULES)}, not '{self.lr_rule}'")
        if self.autocast not in AUTOCAST:
            raise EdgePruneError(f"recovery autocast must be one of {', '.join(AUTOCAST)}, not '{self.autocast}'")

    def use_autocast(self, device) -> bool:
        """Whether the teacher pass and the steps run under bf16 autocast on ``device``."""
        from edgeprune.models.placement import native_bf16

        return self.autocast == "on" or (self.autocast == "auto" and native_bf16(device))


def _trainable(model, freeze_layers: int = 0) -> list[torch.nn.Parameter]:
    frozen = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        frozen.add(id(head.weight))
    if freeze_layers:
        from edgeprune.adapters import get_adapter

        for layer in get_adapter(model).layers[:freeze_layers]:
            frozen.update(id(p) for p in layer.layer.parameters())
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            params.append(p)
    return params


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Mean over positions of KL(teacher || student) on temperature-softened distributions, scaled by T^2 so the
    gradient size does not depend on T."""
    t = temperature
    s = torch.log_softmax(student_logits.float() / t, -1).flatten(0, -2)
    q = torch.log_softmax(teacher_logits.float() / t, -1).flatten(0, -2)
    return torch.nn.functional.kl_div(s, q, log_target=True, reduction="batchmean") * t * t


def _schedule(step: int, steps: int) -> float:
    warm = max(1, steps // 20)
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))


def distill(student, teacher, windows: torch.Tensor, cfg: RecoveryConfig, progress: bool = True) -> dict:
    """Fine-tune ``student`` in place on ``windows`` (steps x batch_size rows of token ids) towards ``teacher``:
    a model (its targets are computed here first) or the TeacherTargets of these windows.
    Returns a JSON-ready record: the config, the loss curve (mean per 10 steps), time and tokens seen."""
    from edgeprune.teacher import TeacherTargets, teacher_targets

    cfg.validate()
    need = cfg.steps * cfg.batch_size
    if windows.shape[0] < need:
        raise EdgePruneError(f"recovery needs {need} windows, got {windows.shape[0]}")
    from edgeprune.models.placement import input_device

    start = time.perf_counter()
    if not isinstance(teacher, TeacherTargets):
        teacher = teacher_targets(teacher, windows[:need], cfg.top_k, cfg.temperature, progress=progress,
                                  autocast=cfg.use_autocast(input_device(teacher)))
    if teacher.indices.shape[0] < need or teacher.temperature != cfg.temperature:
        raise EdgePruneError("the teacher targets do not cover these recovery windows at this temperature")
    working = student.get_input_embeddings().weight.dtype
    if working != torch.float32:
        _cast(student, torch.float32)
    try:
        record = _train(student, teacher, windows, cfg, progress)
    finally:
        if working != torch.float32:
            _cast(student, working)
    record.update(seconds=time.perf_counter() - start, top_k=teacher.k,
                  teacher_targets_mib=teacher.nbytes() / 2**20)
    return record


def _cast(model, dtype) -> None:
    for p in model.parameters():  # parameters only: rotary buffers stay float32
        p.data = p.data.to(dtype)


RMS_FLOOR = 1e-3  # the smallest scale a tensor's learning rate is taken relative to (Adafactor's eps2)


def rms_lrs(params: list[torch.nn.Parameter], lr: float) -> list[dict]:
    """One AdamW parameter group per tensor with learning rate ``lr x max(RMS_FLOOR, RMS(tensor))``, from the
    tensors as they are before training (Adafactor's parameter scaling). Adam moves every element by about its
    learning rate whatever the tensor's scale, so one absolute rate is a different relative step on every model:
    Gemma-3-270M's projections have RMS 0.016-0.04, SmolLM2-135M's ~0.19, and 4e-4 absolute, right for SmolLM2,
    made the pruned Gemma worse (PPL 73.2 -> 117.8 in 40 steps) where 2e-3 relative improves both (Gemma 62.8;
    SmolLM2 69.7, as 4e-4 absolute: 69.5). README "Results" has the measurement. Not handled: a norm stored as an
    offset from 1 (Gemma's ``1 + w``) is scaled by ``w``, so one near 0 barely moves (Gemma-3-270M's are ~30)."""
    groups = []
    for p in params:
        rms = p.detach().float().pow(2).mean().sqrt().item()
        groups.append({"params": [p], "lr": lr * max(RMS_FLOOR, rms)})
    return groups


def _adamw(params: list[torch.nn.Parameter], lr: float, rule: str = "rms") -> torch.optim.AdamW:
    """AdamW (per-tensor learning rates, ``rms_lrs``) with its fused kernel where torch has one for the device
    (CPU and CUDA in torch 2.x): one pass over the parameters instead of a dozen, 0.09 s instead of 0.45 s per step
    for the demo's 80M trained weights."""
    groups = rms_lrs(params, lr) if rule == "rms" else params
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def _train(student, targets, windows: torch.Tensor, cfg: RecoveryConfig, progress: bool) -> dict:
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from edgeprune.models.placement import input_device
    from edgeprune.teacher import topk_kl

    need = cfg.steps * cfg.batch_size
    torch.manual_seed(cfg.seed)
    flags = [(p, p.requires_grad) for p in student.parameters()]
    params = _trainable(student, cfg.freeze_layers)
    opt = _adamw(params, cfg.lr, cfg.lr_rule)
    # the schedule steps the plain optimizer once per step (accelerate's wrapper would step it once per process)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.steps))
    acc = accelerator()
    forward, share, offset = student, cfg.batch_size, 0
    if acc is not None:
        if cfg.batch_size % acc.num_processes:
            raise EdgePruneError(f"the recovery batch size ({cfg.batch_size}) must be a multiple of the number of "
                                 f"processes ({acc.num_processes})")
        share = cfg.batch_size // acc.num_processes
        offset = acc.process_index * share
        forward, opt = acc.prepare(student, opt)  # DDP: the same parameters, gradients all-reduced
    device = input_device(student)
    was_training = student.training
    student.train()
    curve, chunk, steps = [], [], []
    autocast = cfg.use_autocast(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    bar = tqdm(range(cfg.steps), desc="recover (distill)", unit="step", disable=not progress, leave=False)
    try:
        for step in bar:
            first = step * cfg.batch_size + offset
            rows = (first, first + share)  # this process's share of the step's windows
            x = windows[rows[0]:rows[1]].to(device)
            with amp:
                logits = forward(x).logits
            loss = kd = topk_kl(logits, *targets.rows(*rows), cfg.temperature)
            if cfg.ce_weight:
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
                loss = (1 - cfg.ce_weight) * kd + cfg.ce_weight * ce
            if not torch.isfinite(loss):
                raise EdgePruneError(f"recovery diverged at step {step} (loss {loss.item()}); lower --recover-lr")
            if acc is None:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            else:
                acc.backward(loss)
                acc.clip_grad_norm_(params, 1.0)
                kd = acc.reduce(kd.detach(), "mean")  # the whole step's mean KL (equal shares)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            steps.append(kd.item())
            chunk.append(steps[-1])
            bar.set_postfix(kl=f"{kd.item():.3f}")
            if len(chunk) == 10 or step == cfg.steps - 1:
                curve.append(sum(chunk) / len(chunk))
                chunk = []
    finally:
        bar.close()
        student.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
        del opt, forward
        if acc is not None:
            acc.free_memory()
    return {"config": vars(cfg).copy(), "kl_curve": curve, "kl_steps": steps, "tokens": need * windows.shape[1],
            "processes": 1 if acc is None else acc.num_processes, "bf16_autocast": autocast}


def accelerator():
    """An ``accelerate.Accelerator`` when this process is one of several (WORLD_SIZE > 1), else None. On a
    machine without GPUs it is a CPU accelerator (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())
