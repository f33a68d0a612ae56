"""task=distill (soup/tasks/distill.py): the loss is soup/losses/distill.py's distill_loss on the
labelled positions of the student's and the teacher's logits (the divergences themselves are
pinned in tests/unit/losses/test_distill.py), and a teacher with another tokenizer is refused."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from soup.errors import ConfigError
from soup.losses.distill import distill_loss
from soup.tasks.distill import DistillTask
from tests.conftest import compose_config


def task_of(teacher, **settings):
    options = {"teacher": {"path": "teacher-dir"}, "divergence": "forward_kl", "jsd_beta": 0.5, "temperature": 1.0,
               "alpha": 0.5, **settings}
    task = DistillTask(OmegaConf.create(options))
    task.teacher = teacher
    return task


def batch_of(tokenizer):
    rows = [tokenizer("Add 3 and 4.")["input_ids"], tokenizer("Hi there, cat")["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width) < torch.tensor([[len(r)] for r in rows])).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :3] = -100  # a prompt: only the rest is trained
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_the_loss_is_distill_loss_on_the_labelled_positions(model_and_tokenizer):
    student, tokenizer = model_and_tokenizer
    torch.manual_seed(5)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = batch_of(tokenizer)
    task = task_of(teacher, divergence="generalized_jsd", jsd_beta=0.3, temperature=2.0, alpha=0.7)
    out = task.forward(student, batch)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    expected = distill_loss(s, t, targets[keep], 0.7, "generalized_jsd", 0.3, 2.0).sum()
    torch.testing.assert_close(out.loss_sum.detach(), expected, rtol=1e-4, atol=1e-5)
    assert task.units(batch) == int(keep.sum())
    assert out.metric_sums["divergence"] > 0


def test_a_student_equal_to_its_teacher_has_no_divergence_and_temperature_moves_the_loss(model_and_tokenizer):
    student, tokenizer = model_and_tokenizer
    batch = batch_of(tokenizer)
    same = task_of(copy.deepcopy(student), alpha=1.0).forward(student, batch)
    assert same.metric_sums["divergence"] == pytest.approx(0.0, abs=1e-5)
    torch.manual_seed(6)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))
    cold = task_of(teacher, temperature=1.0).forward(student, batch)
    warm = task_of(teacher, temperature=3.0).forward(student, batch)
    assert cold.metric_sums["divergence"] > 1e-3
    assert abs(float(cold.loss_sum) - float(warm.loss_sum)) > 1e-3 * abs(float(cold.loss_sum))


def test_a_teacher_with_another_tokenizer_is_refused_naming_both(model_and_tokenizer, tmp_path):
    from soup.models.tokenizer import build_byte_tokenizer

    student, _ = model_and_tokenizer
    other = build_byte_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    other.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "teacher")
    overrides = ["task=distill", "debug=tiny", f"task.teacher.path={tmp_path / 'teacher'}"]
    with pytest.raises(ConfigError, match="the teacher's tokenizer .* is not the student's") as info:
        DistillTask(compose_config(overrides).task).setup(student, compose_config(overrides), None, torch.device("cpu"))
    assert "task.teacher.path" in str(info.value) and "model.tokenizer_path" in str(info.value)
