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
    options = {"teacher": {"path": "teacher-dir"}, "divergence": "forward_kl", "jsd_beta": 0.5, "temperature": 1.0, "lmbda": 0.0,
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


def _distill_data(tmp_path, *extra):
    """A distill run's config, task and data on the byte tokenizer, with a perturbed copy of a tiny
    Llama as the teacher directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from soup.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(3)
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    cfg = compose_config(["task=distill", "debug=tiny", f"task.teacher.path={tmp_path / 'teacher'}",
                          "data.max_rows=12", "task.divergence=generalized_jsd", "task.temperature=2.0", *extra])
    task = DistillTask(cfg.task)
    return cfg, task, task.build_data(cfg, tokenizer)


@pytest.mark.parametrize("packing", [False, True])
def test_a_top_k_teacher_of_the_whole_vocabulary_gives_the_live_teachers_loss(tmp_path, packing):
    """k = V leaves the rest bucket empty, so the cached teacher is the teacher: same loss to float
    precision, on padded examples and on packed rows alike; a smaller k gives a smaller divergence
    (merging tokens into one bucket loses information)."""
    from soup.models.load import build_model

    extra = ["data.packing=true"] if packing else []
    cfg, live, data = _distill_data(tmp_path, *extra)
    student = build_model(cfg.model, live.tokenizer, cfg.seed)
    live.setup(student, cfg, data, torch.device("cpu"))
    batch = data.collate(data.train[:4])
    expected = live.forward(student, batch)
    vocab = student.config.vocab_size
    for k, cache in ((vocab, "full"), (8, "top8")):
        cfg_k, task, data_k = _distill_data(tmp_path, *extra, f"task.teacher.top_k={k}",
                                            f"task.teacher.cache_dir={tmp_path / cache}")
        lines = task.setup(student, cfg_k, data_k, torch.device("cpu"))
        assert task.teacher is None and any("scored once" in line for line in lines)
        out = task.forward(student, data_k.collate(data_k.train[:4]))
        if k == vocab:
            torch.testing.assert_close(out.loss_sum, expected.loss_sum, rtol=1e-4, atol=1e-5)
        else:
            assert out.metric_sums["divergence"] < expected.metric_sums["divergence"]
    # a second run on the same teacher, data and k reads the cache, and gets the same values
    _, again, data_again = _distill_data(tmp_path, *extra, "task.teacher.top_k=8",
                                         f"task.teacher.cache_dir={tmp_path / 'top8'}")
    lines = again.setup(student, cfg_k, data_again, torch.device("cpu"))
    assert any("read from" in line for line in lines)
    torch.testing.assert_close(data_again.train[0]["teacher_logprobs"], data_k.train[0]["teacher_logprobs"])


def test_an_on_policy_step_trains_the_divergence_on_the_students_own_samples(tmp_path):
    """task.lmbda=1: every step's micro-batches are the rows' prompts with a completion the student
    sampled (seeded by the step), and the loss is the divergence alone whatever task.alpha says."""
    from soup.models.load import build_model

    cfg, task, data = _distill_data(tmp_path, "task.lmbda=1.0", "task.max_new_tokens=6", "task.alpha=0.5")
    student = build_model(cfg.model, task.tokenizer, cfg.seed)
    task.setup(student, cfg, data, torch.device("cpu"))
    rows = data.train[:3]
    first, again = task.prepare_step([rows], data.collate, student, 7), task.prepare_step([rows], data.collate, student, 7)
    batch = first[0]
    torch.testing.assert_close(batch["input_ids"], again[0]["input_ids"])  # the step seeds the sampling
    for i, row in enumerate(rows):
        prompt_length = next(j for j, label in enumerate(row["labels"]) if label != -100)
        assert batch["input_ids"][i, :prompt_length].tolist() == row["input_ids"][:prompt_length]
        trained = batch["labels"][i] != -100
        assert not trained[:prompt_length].any() and 1 <= int(trained.sum()) <= 6
        assert batch["labels"][i][trained].tolist() == batch["input_ids"][i][trained].tolist()
    out = task.forward(student, batch)
    model_batch = {k: v for k, v in batch.items() if k != "on_policy"}
    targets = model_batch["labels"][:, 1:]
    keep = targets != -100
    with torch.no_grad():
        s = student(input_ids=model_batch["input_ids"], attention_mask=model_batch["attention_mask"]).logits[:, :-1][keep]
        t = task.teacher(input_ids=model_batch["input_ids"],
                         attention_mask=model_batch["attention_mask"]).logits[:, :-1][keep]
    expected = distill_loss(s, t, None, 1.0, "generalized_jsd", 0.5, 2.0).sum()
    torch.testing.assert_close(out.loss_sum.detach(), expected, rtol=1e-4, atol=1e-5)
    assert out.metric_sums["on_policy"] == keep.sum()


def test_the_on_policy_draw_is_seeded_by_the_step_and_follows_lmbda():
    task = DistillTask(OmegaConf.create({"lmbda": 0.3}))
    task.seed = 42
    draws = [task.on_policy(step) for step in range(2000)]
    assert draws == [task.on_policy(step) for step in range(2000)]
    assert 0.27 < sum(draws) / len(draws) < 0.33
    assert not any(DistillTask(OmegaConf.create({"lmbda": 0.0})).on_policy(step) for step in range(100))
