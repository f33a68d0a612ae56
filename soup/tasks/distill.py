"""Knowledge distillation into the run's model (the student) from a teacher causal LM.

The student trains on the same rows SFT reads (chat formats or prompt_completion, packing
and multipack included). At every labelled position both models see the same tokens
(teacher forcing); the loss is soup/losses/distill.py's distill_loss: task.alpha x the
divergence (task.divergence: forward_kl, reverse_kl or generalized_jsd with task.jsd_beta)
between the two next-token distributions at task.temperature, plus (1 - alpha) x the
student's cross-entropy on the data's tokens. Teacher and student must share a tokenizer
(the same vocabulary), which setup checks.

The teacher is task.teacher.path, loaded once in float32 (or model.dtype), frozen, on the
run's device. Logged: `divergence` (the divergence alone, without the T^2 factor's effect
on its meaning: the value the loss weighs) and `ce` (the student's cross-entropy), per
token, on the train steps and the val split: the held-out divergence is how close the
student came to the teacher.

Not yet: a cached top-k teacher (soup/losses/distill.py's TopKTeacher is ready for it), a
quantised teacher, and on-policy distillation (GKD's task.lmbda); the next session's work.
"""

from __future__ import annotations

import torch

from soup.errors import ConfigError
from soup.losses.distill import distill_loss
from soup.losses.sft import count_trained_tokens
from soup.tasks.base import Task, TaskData, TaskOutput
from soup.tasks.logps import head_logits, labelled_hidden_states
from soup.tasks.token_data import build_token_data


class DistillTask(Task):
    unit_name = "tokens"

    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        self.teacher: torch.nn.Module | None = None
        self.tokenizer = None

    def build_data(self, cfg, tokenizer) -> TaskData:
        self.tokenizer = tokenizer  # setup compares the teacher's with it
        data = build_token_data(cfg, tokenizer)
        t = self.cfg
        beta = f" (beta {t.jsd_beta:g})" if t.divergence == "generalized_jsd" else ""
        data.lines.append(f"distill: {t.alpha:g} x {t.divergence}{beta} at temperature {t.temperature:g} + "
                          f"{1 - t.alpha:g} x cross-entropy, teacher {t.teacher.path}")
        return data

    def setup(self, model, cfg=None, data=None, device=None, autocast=None) -> list[str]:
        from transformers import AutoModelForCausalLM

        from soup.models.files import model_source
        from soup.models.load import DTYPES, build_tokenizer
        from soup.models.tokenizer import load_tokenizer

        path = self.cfg.teacher.path
        teacher_tokenizer = load_tokenizer(model_source(path, "task.teacher.path", needs_weights=False),
                                           cfg.model.trust_remote_code)
        student_tokenizer = self.tokenizer or build_tokenizer(cfg.model)
        if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
            student = cfg.model.tokenizer_path or cfg.model.path or "model=tiny's byte tokenizer"
            raise ConfigError(f"task.teacher.path={path}: the teacher's tokenizer ({len(teacher_tokenizer)} tokens) "
                              f"is not the student's ({student}, {len(student_tokenizer)} tokens), so their "
                              "next-token distributions cannot be compared.\n  fix: train a student on the teacher's "
                              f"tokenizer (model.tokenizer_path={path} with model=tiny, or a model of its family).")
        self.teacher = AutoModelForCausalLM.from_pretrained(
            model_source(path, "task.teacher.path"), dtype=DTYPES[cfg.model.dtype],
            trust_remote_code=cfg.model.trust_remote_code).to(device).eval().requires_grad_(False)
        parameters = sum(p.numel() for p in self.teacher.parameters())
        return [f"teacher: {path}, {parameters / 1e6:.2f}M parameters, frozen"]

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_trained_tokens(batch["labels"])

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        t = self.cfg
        hidden, targets, _ = labelled_hidden_states(model, batch)
        student_logits = head_logits(model, hidden)
        with torch.no_grad():
            teacher_hidden, _, _ = labelled_hidden_states(self.teacher, batch)
            teacher_logits = head_logits(self.teacher, teacher_hidden)
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ConfigError(f"task.teacher.path={t.teacher.path}: the teacher scores {teacher_logits.shape[-1]} "
                              f"tokens, the student {student_logits.shape[-1]}.\n  fix: give the student the "
                              "teacher's vocabulary size.")
        losses, soft, ce = distill_loss(student_logits, teacher_logits, targets, t.alpha, t.divergence, t.jsd_beta,
                                        t.temperature, return_terms=True)
        # The divergence is logged as the divergence itself, without the loss's T^2 factor.
        div = soft.detach().sum() / t.temperature**2
        return TaskOutput(loss_sum=losses.sum(), metric_sums={"divergence": float(div), "ce": float(ce.detach().sum())})
