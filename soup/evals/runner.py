"""Run a suite's tasks on one model: `python -m soup.eval` and `train.eval_gate` both call run_suite.

Each kind returns metrics named `<task>/<metric>` (the names eval.json, the tracker and the
gate use) and one sample row per input row (what was asked, answered, extracted and scored),
so a figure can always be traced back to the rows behind it.

- loss: the training loop's own evaluation (soup/loop.py `evaluate`) on the file, tokenized by
  soup's data pipeline as the run's data group says: the same loss and ppl the loop logs.
- generation: completions from soup's rollout engine (greedy by default), or a column of
  given completions, scored by soup/evals/scorers.py -> accuracy (tool_call: name_accuracy too).
- multiple_choice: each choice's log-likelihood after the question -> acc, and acc_norm with the
  log-likelihood divided by the choice's length in characters (lm-evaluation-harness's acc_norm).
- judge: completions as in generation; a local judge model reads the rubric, and the row's score
  is its expected rating: the ratings' log-likelihoods as the judge's next words, softmaxed over
  the scale and averaged (G-Eval, Liu et al. 2023, arXiv 2303.16634, section 2.3) -> score,
  score_normalised (0 at min_score, 1 at max_score).
- lm_eval: lm-evaluation-harness tasks from local files (soup/evals/harness.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from soup.config.schema import DataConfig
from soup.data.collate import collate_padded
from soup.data.dataset import build_datasets
from soup.data.readers import Row, read_rows, row_error
from soup.errors import DataError
from soup.evals.likelihood import continuation_logprobs
from soup.evals.scorers import score
from soup.evals.suite import LOSS_DATA_FIELDS, LOSS_TASKS, Suite, SuiteTask
from soup.rollout.engine import SamplingParams

# The metrics each kind's runner below reports (generation's name_accuracy: scorer tool_call only);
# lm_eval's depend on its tasks. train.eval_gate_metrics is checked against them at config load.
KIND_METRICS = {"loss": ("loss", "ppl"), "generation": ("accuracy", "name_accuracy"),
                "multiple_choice": ("acc", "acc_norm"), "judge": ("score", "score_normalised")}
# Metrics that fall when the model gets better; every other metric rises (soup/evals/gate.py).
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
                   "brier_score", "ter")


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1].split(".")[0] in LOWER_IS_BETTER


@dataclass
class EvalContext:
    """What every task of a suite shares. `model()` loads the evaluated model on first use (a suite
    that only scores given completions never loads it)."""

    model: Callable[[], torch.nn.Module]
    tokenizer: Any
    device: torch.device
    batch_size: int = 8
    seed: int = 42
    precision: str = "fp32"
    run_cfg: Optional[DictConfig] = None  # the config of the run that trained the model, when there is one
    chat_template: Optional[str] = None  # the template generation prompts are rendered with (None: text as is)
    _judges: dict = field(default_factory=dict)


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]  # metric -> value (without the task's name)
    rows: int
    samples: list[dict] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def run_suite(suite: Suite, ctx: EvalContext, log: Callable[[str], None] = print) -> list[TaskResult]:
    results = []
    for task in suite.tasks:
        result = KIND_RUNNERS[task.kind](task, ctx)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        log(f"[soup] eval {task.name} ({task.kind}, {result.rows} rows): {shown}")
        results.append(result)
    return results


def flat_metrics(results: list[TaskResult]) -> dict[str, float]:
    return {f"{r.name}/{metric}": value for r in results for metric, value in r.metrics.items()}


def write_samples(results: list[TaskResult], folder: Path) -> None:
    """One JSONL per task: the rows behind its figures."""
    folder.mkdir(parents=True, exist_ok=True)
    for result in results:
        with open(folder / f"{result.name}.jsonl", "w", encoding="utf-8") as out:
            for sample in result.samples:
                out.write(json.dumps(sample, ensure_ascii=False, default=str) + "\n")


def _batch(task: SuiteTask, ctx: EvalContext) -> int:
    return task.batch_size or ctx.batch_size


def _rows(task: SuiteTask) -> list[Row]:
    rows = read_rows(task.file, max_rows=task.max_rows)
    if not rows:
        raise DataError(f"{task.where}: {task.file} holds no rows", path=task.file, fix="point file at a data file.")
    return rows


# ---------------------------------------------------------------- loss

def run_loss(task: SuiteTask, ctx: EvalContext) -> TaskResult:
    from soup.loop import evaluate
    from soup.tasks import TASKS

    run = ctx.run_cfg
    run_task = run.task.name if run is not None else None
    task_name = task.task or (run_task if run_task in LOSS_TASKS else "sft")
    data = OmegaConf.structured(DataConfig(name="file"))
    for key in LOSS_DATA_FIELDS:
        if run is not None and key in run.data:
            data[key] = run.data[key]
    for key, value in (task.data or {}).items():
        data[key] = value
    data.train_file, data.max_rows = task.file, task.max_rows
    splits = build_datasets(data, ctx.tokenizer, task_name, ctx.seed)
    scorer = TASKS[task_name](OmegaConf.create({"name": task_name}))
    pad_id = ctx.tokenizer.pad_token_id

    def collate(examples):
        return collate_padded(examples, pad_id)

    batch_size = task.batch_size or (run.train.eval_batch_size if run is not None else ctx.batch_size)
    model = ctx.model()
    was_training = model.training
    metrics = evaluate(model, scorer, splits.train, collate, batch_size, ctx.device, ctx.precision, shard=False)
    model.train(was_training)
    tokens = sum(scorer.units(collate(splits.train[i:i + batch_size])) for i in range(0, len(splits.train),
                                                                                       batch_size))
    return TaskResult(task.name, task.kind, {"loss": metrics["loss"], "ppl": metrics["ppl"]}, len(splits.train),
                      info={"tokens": tokens, "task": task_name, "data": {k: data[k] for k in LOSS_DATA_FIELDS}})


# ---------------------------------------------------------------- generation and judge

def _completions(task: SuiteTask, ctx: EvalContext, rows: list[Row]) -> tuple[list[Any], list[str], list[str]]:
    """(each row's prompt as shown, its completion, its finish reason): given in completion_column,
    or sampled from the evaluated model."""
    if task.completion_column is not None:
        texts = []
        for row in rows:
            value = row.record.get(task.completion_column)
            if not isinstance(value, str):
                raise row_error(row, f"{task.where}: completion_column {task.completion_column!r} is "
                                     f"{json.dumps(value)[:60]}, not text",
                                fix="give every row its completion as a string, or drop completion_column to "
                                    "generate them.")
            texts.append(value)
        shown = [row.record.get("prompt", row.record.get("messages")) for row in rows]
        return shown, texts, ["given"] * len(rows)
    from soup.generate import check_context, render_prompt, sample_prompts

    model = ctx.model()
    prompts = [render_prompt(row, ctx.tokenizer, ctx.chat_template, task.system_prompt) for row in rows]
    check_context(prompts, model, task.max_new_tokens)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(ctx.seed)
    params = SamplingParams(max_completion_length=task.max_new_tokens, temperature=task.temperature)
    texts, finishes = [], []
    was_training = model.training
    model.eval()
    for batch in sample_prompts(model, ctx.tokenizer, prompts, params, _batch(task, ctx), generator):
        texts += [c.text for c in batch.completions]
        finishes += [c.finish_reason for c in batch.completions]
    model.train(was_training)
    return [p.shown for p in prompts], texts, finishes


def _reference(task: SuiteTask, row: Row, required: bool) -> Any:
    column = task.reference_column
    if column is None:
        return None
    if column not in row.record and required:
        raise row_error(row, f"{task.where}: the row has no `{column}` column (its keys: {', '.join(row.record)})",
                        fix="give every row its reference, or set reference_column to the column holding it.")
    return row.record.get(column)


def run_generation(task: SuiteTask, ctx: EvalContext) -> TaskResult:
    rows = _rows(task)
    required = task.scorer != "regex"
    references = [_reference(task, row, required) for row in rows]
    shown, texts, finishes = _completions(task, ctx, rows)
    values, names, samples = [], [], []
    for row, prompt, text, finish, reference in zip(rows, shown, texts, finishes, references):
        result = score(task.scorer, text, reference, pattern=task.pattern)
        if result is not None:
            values.append(result.value)
            if "name_match" in result.detail:
                names.append(result.detail["name_match"])
        samples.append({"row": row.where, "prompt": prompt, "completion": text, "finish_reason": finish,
                        "reference": reference, "extracted": None if result is None else result.extracted,
                        "score": None if result is None else result.value,
                        **({} if result is None else result.detail)})
    if not values:
        raise DataError(f"{task.where}: no row of {task.file} has a reference to score against",
                        path=task.file, fix=f"fill the `{task.reference_column}` column.")
    metrics = {"accuracy": sum(values) / len(values)}
    if names:
        metrics["name_accuracy"] = sum(names) / len(names)
    return TaskResult(task.name, task.kind, metrics, len(rows), samples,
                      info={"scored": len(values), "scorer": task.scorer})


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
    return str(prompt)


def _judge(folder: str, ctx: EvalContext):
    if folder not in ctx._judges:
        from transformers import AutoModelForCausalLM

        from soup.models.tokenizer import load_tokenizer

        judge = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(ctx.device).eval()
        ctx._judges[folder] = (judge, load_tokenizer(folder, False))
    return ctx._judges[folder]


def run_judge(task: SuiteTask, ctx: EvalContext) -> TaskResult:
    rows = _rows(task)
    references = [_reference(task, row, True) for row in rows]
    shown, texts, finishes = _completions(task, ctx, rows)
    judge, judge_tokenizer = _judge(task.judge, ctx)
    scale = list(range(task.min_score, task.max_score + 1))
    pairs = []
    templated = isinstance(judge_tokenizer.chat_template, str)
    for prompt, text, reference in zip(shown, texts, references):
        question = task.rubric.format(prompt=_prompt_text(prompt), completion=text, reference=reference)
        if templated:
            question = judge_tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                           add_generation_prompt=True)
        delimiter = "" if question[-1:].isspace() else " "
        pairs += [(question, f"{delimiter}{rating}") for rating in scale]
    # A rendered chat template writes its own special tokens (BOS): the tokenizer adds none.
    logprobs = [s.logprob for s in continuation_logprobs(judge, judge_tokenizer, pairs, _batch(task, ctx) * len(scale),
                                                         add_special_tokens=not templated)]
    ratings, samples = [], []
    for i, (row, prompt, text, finish) in enumerate(zip(rows, shown, texts, finishes)):
        weights = torch.tensor(logprobs[i * len(scale):(i + 1) * len(scale)]).softmax(0)
        rating = float(sum(w * r for w, r in zip(weights.tolist(), scale)))
        ratings.append(rating)
        samples.append({"row": row.where, "prompt": prompt, "completion": text, "finish_reason": finish,
                        "score": rating, "probabilities": dict(zip(map(str, scale), weights.tolist()))})
    mean = sum(ratings) / len(ratings)
    metrics = {"score": mean, "score_normalised": (mean - task.min_score) / (task.max_score - task.min_score)}
    return TaskResult(task.name, task.kind, metrics, len(rows), samples, info={"judge": task.judge})


# ---------------------------------------------------------------- multiple choice

def _choice_row(task: SuiteTask, row: Row) -> tuple[str, list[str], int]:
    question = row.record.get(task.question_column)
    choices = row.record.get(task.choices_column)
    answer = row.record.get(task.reference_column)
    fix = (f"rows {{{task.question_column}: text, {task.choices_column}: [text, ...], {task.reference_column}: "
           "the right choice's 0-based index, letter (A, B, ...) or text}; rename columns with question_column, "
           "choices_column, reference_column.")
    if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2 or \
            not all(isinstance(c, str) and c for c in choices):
        raise row_error(row, f"{task.where}: `{task.question_column}` must be text and `{task.choices_column}` a "
                             "list of two or more non-empty texts", fix=fix)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return question, choices, answer
    if isinstance(answer, str) and answer in choices:
        return question, choices, choices.index(answer)
    if isinstance(answer, str) and len(answer) == 1 and 0 <= ord(answer.upper()) - ord("A") < len(choices):
        return question, choices, ord(answer.upper()) - ord("A")
    raise row_error(row, f"{task.where}: `{task.reference_column}` is {json.dumps(answer)[:40]}, which names none "
                         f"of the {len(choices)} choices", fix=fix)


def run_multiple_choice(task: SuiteTask, ctx: EvalContext) -> TaskResult:
    rows = _rows(task)
    parsed = [_choice_row(task, row) for row in rows]
    pairs = [(question, task.delimiter + choice) for question, choices, _ in parsed for choice in choices]
    logprobs = [s.logprob for s in continuation_logprobs(ctx.model(), ctx.tokenizer, pairs, _batch(task, ctx))]
    correct = correct_norm = 0
    samples, at = [], 0
    for row, (question, choices, answer) in zip(rows, parsed):
        scores = logprobs[at:at + len(choices)]
        at += len(choices)
        normalised = [s / len(c) for s, c in zip(scores, choices)]
        best, best_norm = _argmax(scores), _argmax(normalised)
        correct += best == answer
        correct_norm += best_norm == answer
        samples.append({"row": row.where, "question": question, "choices": choices, "answer": answer,
                        "logprobs": scores, "chosen": best, "chosen_norm": best_norm})
    return TaskResult(task.name, task.kind, {"acc": correct / len(rows), "acc_norm": correct_norm / len(rows)},
                      len(rows), samples)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ---------------------------------------------------------------- lm-evaluation-harness

def run_lm_eval(task: SuiteTask, ctx: EvalContext) -> TaskResult:
    from soup.checkpoint import capture_rng, restore_rng
    from soup.evals.harness import run_lm_eval as harness

    model = ctx.model()
    # lm_eval reseeds the global generators and puts the model in eval mode: a gate inside a
    # training run gets both back as they were, so the run trains as it would without the gate.
    rng, was_training = capture_rng(), model.training
    try:
        metrics = harness(model, ctx.tokenizer, tasks=list(task.tasks), include_path=task.include_path,
                          num_fewshot=task.num_fewshot, limit=task.limit, batch_size=_batch(task, ctx),
                          device=ctx.device, seed=ctx.seed, where=task.where)
    finally:
        restore_rng(rng)
        model.train(was_training)
    return TaskResult(task.name, task.kind, {k: v for k, v in metrics.items() if math.isfinite(v)},
                      task.limit or 0, info={"tasks": list(task.tasks)})


KIND_RUNNERS: dict[str, Callable[[SuiteTask, EvalContext], TaskResult]] = {
    "loss": run_loss, "generation": run_generation, "multiple_choice": run_multiple_choice, "judge": run_judge,
    "lm_eval": run_lm_eval,
}
