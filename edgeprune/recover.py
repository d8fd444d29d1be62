"""Recovery by knowledge distillation: a short fine-tune of the pruned model (the student) towards the unpruned
model (the teacher) on calibration text.

The loss is the KL divergence from the teacher's next-token distribution to the student's at every position
(Hinton et al.'s distillation at temperature ``temperature``; Sheared-LLaMA and Minitron recover pruned models the
same way). Distilling rather than fitting the text's own next tokens is deliberate: the target is the model the
user started from, so recovery restores what pruning removed and does not teach the student the calibration
text's domain (a plain language-model fine-tune on WikiText would also lower the *dense* model's WikiText PPL,
which makes a pruned-vs-dense comparison dishonest). ``ce_weight`` mixes in that next-token loss for users who
want it anyway.

Every decoder weight is trained (the model is small enough for a full fine-tune on a CPU; LoRA saves optimizer
memory, not the backward pass that dominates the time here); the token embedding, tied to the output head in
SmolLM2, stays frozen, so the vocabulary matrix is neither updated nor given optimizer state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from edgeprune.errors import EdgePruneError


@dataclass
class RecoveryConfig:
    steps: int = 0  # optimizer steps; 0 = no recovery
    lr: float = 4e-4  # peak learning rate (linear warm-up over 5% of the steps, then cosine decay to 0)
    batch_size: int = 4  # windows per step
    temperature: float = 1.0
    ce_weight: float = 0.0  # share of the next-token cross-entropy in the loss (0 = pure distillation)
    seed: int = 1  # window sampling; differs from the scoring windows' seed by default

    def validate(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise EdgePruneError("recovery steps must be >= 0 and its batch size >= 1")
        if not self.lr > 0 or not self.temperature > 0:
            raise EdgePruneError("recovery learning rate and temperature must be positive")
        if not 0 <= self.ce_weight <= 1:
            raise EdgePruneError("recovery ce_weight must be in [0, 1]")


def _trainable(model) -> list[torch.nn.Parameter]:
    frozen = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        frozen.add(id(head.weight))
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
    """Fine-tune ``student`` in place on ``windows`` (steps x batch_size rows of token ids) towards ``teacher``.
    Returns a JSON-ready record: the config, the loss curve (mean per 10 steps), time and tokens seen."""
    from tqdm.auto import tqdm

    cfg.validate()
    need = cfg.steps * cfg.batch_size
    if windows.shape[0] < need:
        raise EdgePruneError(f"recovery needs {need} windows, got {windows.shape[0]}")
    torch.manual_seed(cfg.seed)
    flags = [(p, p.requires_grad) for p in student.parameters()]
    params = _trainable(student)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, cfg.steps))
    teacher.eval()
    was_training = student.training
    student.train()
    curve, chunk, start = [], [], time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="recover (distill)", unit="step", disable=not progress, leave=False)
    try:
        for step in bar:
            x = windows[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            with torch.no_grad():
                target = teacher(x).logits
            logits = student(x).logits
            loss = kd = distillation_loss(logits, target, cfg.temperature)
            if cfg.ce_weight:
                ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten())
                loss = (1 - cfg.ce_weight) * kd + cfg.ce_weight * ce
            if not torch.isfinite(loss):
                raise EdgePruneError(f"recovery diverged at step {step} (loss {loss.item()}); lower --recover-lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            chunk.append(kd.item())
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
        del opt
    return {"config": vars(cfg).copy(), "kl_curve": curve, "tokens": need * windows.shape[1],
            "seconds": time.perf_counter() - start}
