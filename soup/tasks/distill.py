"""Knowledge distillation into the run's model (the student) from a teacher causal LM.

The student trains on the same rows SFT reads (chat formats or prompt_completion, packing
and multipack included). At every labelled position both models see the same tokens
(teacher forcing); the loss is soup/losses/distill.py's distill_loss: task.alpha x the
divergence (task.divergence: forward_kl, reverse_kl or generalized_jsd with task.jsd_beta)
between the two next-token distributions at task.temperature, plus (1 - alpha) x the
student's cross-entropy on the data's tokens. Teacher and student must share a tokenizer
(the same vocabulary), which setup checks.

The teacher is task.teacher.path, loaded once in float32 (or model.dtype), frozen, on the
run's device; task.teacher.quant=8bit|4bit loads it with bitsandbytes weights instead (a
quarter or an eighth of the memory, its distributions slightly perturbed). Logged: `divergence` (the divergence alone, without the T^2 factor's effect
on its meaning: the value the loss weighs) and `ce` (the student's cross-entropy), per
token, on the train steps and the val split: the held-out divergence is how close the
student came to the teacher.

task.teacher.top_k=k makes the teacher offline (soup/tasks/teacher_cache.py): its top-k log-probs
at every trained position are computed once, cached on disk, carried by the batches, and the
teacher is unloaded before training; the divergence is then taken over those k tokens plus a
"rest" bucket (a lower bound of the full one, equal at k = V).

On-policy distillation (GKD, Agarwal et al. 2023, arXiv 2306.13649): with probability task.lmbda
(drawn per optimizer step from the seed and the step, so resume is exact) a step's micro-batches
are the rows' prompts with completions the student samples itself (soup/rollout/engine.py,
temperature 1, up to task.max_new_tokens, seeded by step); the teacher scores those tokens and
only the divergence is trained on them (alpha = 1: a sample has no ground truth to imitate).
The data's own steps keep task.alpha. Logged: `on_policy`, the share of a step's tokens sampled.
"""

from __future__ import annotations

import random

import torch

from soup.data.tokenize import IGNORE_INDEX as IGNORE
from soup.errors import ConfigError
from soup.losses.distill import TopKTeacher, distill_loss
from soup.losses.sft import count_trained_tokens
from soup.models.quant import load_quantized
from soup.tasks.base import Task, TaskData, TaskOutput
from soup.tasks.logps import head_logits, labelled_hidden_states
from soup.tasks.teacher_cache import IDS, LOGPROBS, attach_top_k, with_cached_teacher
from soup.tasks.token_data import build_token_data


ON_POLICY = "on_policy"  # a batch key: this micro-batch holds the student's own samples


def teacher_quant_config(name: str):
    """The quant group's settings for a teacher loaded with `name` (8bit, or 4bit with quant=4bit's defaults)."""
    from omegaconf import OmegaConf

    from soup.config.schema import QuantConfig

    return OmegaConf.merge(OmegaConf.structured(QuantConfig), {"name": name})


class DistillTask(Task):
    unit_name = "tokens"

    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        self.teacher: torch.nn.Module | None = None
        self.tokenizer = None
        self.seed = 0

    def build_data(self, cfg, tokenizer) -> TaskData:
        self.tokenizer = tokenizer  # setup compares the teacher's with it; on-policy steps decode with it
        self.seed = cfg.seed
        data = build_token_data(cfg, tokenizer)
        t = self.cfg
        beta = f" (beta {t.jsd_beta:g})" if t.divergence == "generalized_jsd" else ""
        data.lines.append(f"distill: {t.alpha:g} x {t.divergence}{beta} at temperature {t.temperature:g} + "
                          f"{1 - t.alpha:g} x cross-entropy, teacher {t.teacher.path}")
        if t.lmbda > 0:
            data.lines.append(f"distill: on-policy (GKD) with probability {t.lmbda:g} per step: the student samples "
                              f"up to {t.max_new_tokens} tokens from each row's prompt, divergence only")
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
        source = model_source(path, "task.teacher.path")
        # The student's attention implementation: packed batches are collated for it (a flash-attention
        # row is flat, documents told apart by position ids), and the teacher reads the same batches.
        kwargs = {"dtype": DTYPES[cfg.model.dtype], "trust_remote_code": cfg.model.trust_remote_code,
                  "attn_implementation": cfg.model.attn_implementation}
        quant = self.cfg.teacher.quant
        if quant == "none":
            teacher = AutoModelForCausalLM.from_pretrained(source, **kwargs).to(device)
        else:
            teacher = load_quantized(source, teacher_quant_config(quant), device, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        parameters = sum(p.numel() for p in self.teacher.parameters())
        weights = "" if quant == "none" else f", {quant} bitsandbytes weights"
        lines = [f"teacher: {path}, {parameters / 1e6:.2f}M parameters{weights}, frozen"]
        if self.cfg.teacher.top_k is not None:
            lines += self._cache_top_k(cfg, data, device)
        return lines

    def _cache_top_k(self, cfg, data, device) -> list[str]:
        """Score every train and val item once with the teacher (soup/tasks/teacher_cache.py), then let the
        teacher go: the batches carry its top-k log-probs from here on."""
        from soup.models.reference import weights_fingerprint

        k, t = self.cfg.teacher.top_k, self.cfg
        teacher_key = f"{weights_fingerprint(self.teacher)}|quant={t.teacher.quant}"
        eval_collate = data.eval_collate or data.collate
        lines = []
        for split, items, collate in (("train", data.train, data.collate), ("val", data.val, eval_collate)):
            if not items:
                continue
            path, cached = attach_top_k(items, collate, self.teacher, k, t.temperature, cfg.train.eval_batch_size,
                                        device, t.teacher.cache_dir, teacher_key)
            positions = sum(item[LOGPROBS].shape[0] for item in items)
            lines.append(f"teacher top-{k} ({split}): {positions:,} positions "
                         f"{'read from' if cached else 'scored once, cached in'} {path}")
        data.collate, data.eval_collate = with_cached_teacher(data.collate), with_cached_teacher(eval_collate)
        self.teacher = None  # the batches hold what it had to say
        lines.append("teacher unloaded: training reads its cached top-k log-probs (plus a rest bucket)")
        return lines

    # --- on-policy steps (GKD) ----------------------------------------------------------------
    def on_policy(self, step: int) -> bool:
        """Whether optimizer step `step` trains on the student's own samples: a draw seeded by the run's
        seed and the step, so a resumed run decides every step as the uninterrupted one did."""
        return self.cfg.lmbda > 0 and random.Random(self.seed * 1_000_003 + step).random() < self.cfg.lmbda

    def prepare_step(self, micro_rows: list[list], collate, model: torch.nn.Module, step: int) -> list[dict]:
        if not self.on_policy(step):
            return [collate(rows) for rows in micro_rows]
        return [self._student_batch(rows, collate, model, step, i) for i, rows in enumerate(micro_rows)]

    def _student_batch(self, rows: list[dict], collate, model: torch.nn.Module, step: int, index: int) -> dict:
        """The rows' prompts (the tokens before each row's first trained one) with a completion the
        student samples at temperature 1, the completion's tokens (stop token included) trained."""
        from soup.distributed import any_rank, forward_is_collective
        from soup.rollout.engine import SamplingParams, sample
        from soup.tasks.prompts import stop_token_ids

        prompts = []
        for row in rows:
            first = next((i for i, label in enumerate(row["labels"]) if label != IGNORE), len(row["labels"]))
            prompts.append(list(row["input_ids"][:max(first, 1)]))
        generator = torch.Generator(device=next(model.parameters()).device)
        generator.manual_seed(self.seed * 1_000_003 + step * 1_009 + index + 1)
        rollout = sample(model, prompts, SamplingParams(max_completion_length=self.cfg.max_new_tokens),
                         pad_id=self.tokenizer.pad_token_id, stop_ids=stop_token_ids(self.tokenizer),
                         generator=generator, any_rank_live=any_rank if forward_is_collective(model) else None)
        examples = []
        for prompt, ids, mask in zip(prompts, rollout.completion_ids.tolist(), rollout.completion_mask.tolist()):
            completion = [token for token, keep in zip(ids, mask) if keep]
            examples.append({"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion})
        batch = collate(examples)
        batch[ON_POLICY] = torch.ones(())
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_trained_tokens(batch["labels"])

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        t = self.cfg
        on_policy = ON_POLICY in batch
        if on_policy:
            batch = {k: v for k, v in batch.items() if k != ON_POLICY}
        if LOGPROBS in batch:  # an offline teacher: its cached top-k log-probs ride in the batch
            batch = dict(batch)
            teacher = TopKTeacher(batch.pop(LOGPROBS), batch.pop(IDS))
            hidden, targets, _ = labelled_hidden_states(model, batch)
            return self._loss(head_logits(model, hidden), teacher, targets)
        hidden, targets, _ = labelled_hidden_states(model, batch)
        student_logits = head_logits(model, hidden)
        with torch.no_grad():
            teacher_hidden, _, _ = labelled_hidden_states(self.teacher, batch)
            teacher_logits = head_logits(self.teacher, teacher_hidden)
        if teacher_logits.shape[-1] != student_logits.shape[-1]:
            raise ConfigError(f"task.teacher.path={t.teacher.path}: the teacher scores {teacher_logits.shape[-1]} "
                              f"tokens, the student {student_logits.shape[-1]}.\n  fix: give the student the "
                              "teacher's vocabulary size.")
        return self._loss(student_logits, teacher_logits, targets, on_policy)

    def _loss(self, student_logits, teacher, targets, on_policy: bool = False) -> TaskOutput:
        t = self.cfg
        # The student's own samples have no ground truth to imitate: the divergence alone (GKD).
        alpha = 1.0 if on_policy else t.alpha
        losses, soft, ce = distill_loss(student_logits, teacher, targets, alpha, t.divergence, t.jsd_beta,
                                        t.temperature, return_terms=True)
        # The divergence is logged as the divergence itself, without the loss's T^2 factor.
        div = soft.detach().sum() / t.temperature**2
        sums = {"divergence": float(div), "ce": float(ce.detach().sum())}
        if t.lmbda > 0:  # the share of the step's tokens the student sampled itself
            sums["on_policy"] = float(losses.shape[0]) if on_policy else 0.0
        return TaskOutput(loss_sum=losses.sum(), metric_sums=sums)
