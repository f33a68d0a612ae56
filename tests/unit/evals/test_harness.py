"""The `lm_eval` task kind (soup/evals/harness.py): a local multiple-choice task scored by
lm-evaluation-harness on stories260k equals the same scoring done by hand here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from soup.errors import ConfigError
from soup.evals.harness import check_lm_eval, flatten_results, run_lm_eval
from tests.conftest import require_shared

CPU = torch.device("cpu")
WHERE = "suite.yaml: tasks.stories_mc"
# Story questions with choices of different lengths, so length normalisation can change a pick.
ROWS = [
    {"question": "Lily went to the park with her", "choices": ["mom", "spaceship", "big red ball"], "answer": 0},
    {"question": "The cat liked to drink", "choices": ["milk", "rocks", "the big blue sea"], "answer": 0},
    {"question": "Tim was sad because his toy was", "choices": ["happy", "broken", "a tree"], "answer": 1},
    {"question": "The sun was hot and the sky was", "choices": ["blue", "loud", "very hungry"], "answer": 0},
    {"question": "She gave the dog a", "choices": ["bone", "car", "beautiful shiny hat"], "answer": 0},
    {"question": "Ben and his friend played with a", "choices": ["ball", "cloud", "sad"], "answer": 0},
]
TASK_YAML = """\
task: stories_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
"""


def context_of(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer:"


def choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    """Sum of log p(continuation tokens | context), split as lm_eval splits a causal pair: the
    continuation is " " + choice (target_delimiter), both strings are encoded with BOS, and the
    continuation's tokens are the whole encoding past the context encoding's length."""
    context_ids = tokenizer.encode(context)
    whole_ids = tokenizer.encode(context + " " + choice)
    continuation_ids = whole_ids[len(context_ids):]
    assert continuation_ids, (context, choice)
    with torch.no_grad():
        logits = model(torch.tensor([whole_ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    # the token at position i is predicted by the logits at position i - 1
    positions = range(len(context_ids) - 1, len(whole_ids) - 1)
    return sum(logprobs[p, whole_ids[p + 1]].item() for p in positions)


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = require_shared("models/stories260k")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def include_path(tmp_path_factory) -> str:
    """A folder with the task YAML, its data beside it; one per module, so the second test reuses
    the task index run_lm_eval built for the first (indexing lm_eval's own YAMLs takes seconds)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "stories_mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "stories_mc.yaml").write_text(TASK_YAML.format(data=data, cache=root / "datasets_cache"))
    return str(tasks)


@pytest.mark.shared
def test_local_multiple_choice_task_scores_as_summed_choice_logprobs_by_hand(include_path, stories):
    model, tokenizer = stories
    pad_before = tokenizer.pad_token
    offline_before = os.environ.get("HF_HUB_OFFLINE")

    metrics = run_lm_eval(model, tokenizer, tasks=["stories_mc"], include_path=include_path,
                          num_fewshot=0, limit=None, batch_size=4, device=CPU, seed=0, where=WHERE)

    hits, norm_hits = 0, 0
    for row in ROWS:
        logprobs = [choice_logprob(model, tokenizer, context_of(row), c) for c in row["choices"]]
        hits += max(range(len(logprobs)), key=lambda i: logprobs[i]) == row["answer"]
        # acc_norm divides by the choice's length in characters (delimiter excluded)
        per_char = [lp / len(c) for lp, c in zip(logprobs, row["choices"])]
        norm_hits += max(range(len(per_char)), key=lambda i: per_char[i]) == row["answer"]
    assert set(metrics) == {"stories_mc/acc", "stories_mc/acc_norm"}
    assert metrics["stories_mc/acc"] == pytest.approx(hits / len(ROWS))
    assert metrics["stories_mc/acc_norm"] == pytest.approx(norm_hits / len(ROWS))
    assert hits != norm_hits  # these rows tell the two scores apart
    # soup's own multiple_choice kind on the same rows and context gives lm_eval's figures.
    from soup.evals.runner import EvalContext, run_multiple_choice
    from soup.evals.suite import read_suite

    rows = Path(include_path).parent / "soup_mc.jsonl"
    rows.write_text("".join(json.dumps({**row, "question": context_of(row)}) + "\n" for row in ROWS))
    (rows.parent / "suite.yaml").write_text(f"tasks:\n  mc:\n    kind: multiple_choice\n    file: {rows}\n")
    ours = run_multiple_choice(read_suite(str(rows.parent / "suite.yaml")).tasks[0],
                               EvalContext(lambda: model, tokenizer, CPU))
    assert ours.metrics == {"acc": metrics["stories_mc/acc"], "acc_norm": metrics["stories_mc/acc_norm"]}
    assert tokenizer.pad_token == pad_before  # lm_eval's pad token went to a copy
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before


@pytest.mark.shared
def test_task_name_lm_eval_does_not_know_names_it_and_the_include_path(include_path, stories):
    check_lm_eval(WHERE)  # without lm_eval, the ConfigError it raises skips this test (conftest.py)
    model, tokenizer = stories
    with pytest.raises(ConfigError) as error:
        run_lm_eval(model, tokenizer, tasks=["stories_mcq"], include_path=include_path, num_fewshot=0,
                    limit=None, batch_size=4, device=CPU, seed=0, where=WHERE)
    message = str(error.value)
    assert "'stories_mcq'" in message and include_path in message and "close: stories_mc" in message
    assert "\n  fix: " in message


def test_check_lm_eval_names_the_extra_and_the_task_to_drop_when_it_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ConfigError) as error:
        check_lm_eval(WHERE)
    message = str(error.value)
    assert "`lm_eval` task kind needs the optional package" in message
    assert message.splitlines()[-1] == f"  fix: pip install 'soup-harness[lm_eval]' (or drop the task from {WHERE})"


def test_results_flatten_to_task_slash_metric_keeping_named_filters_only():
    results = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                         "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"},
               "arc_easy": {"alias": "arc_easy", "acc,none": 0.75, "acc_stderr,none": "N/A", "acc_norm,none": 1,
                            "sample_len": 4}}
    assert flatten_results(results) == {"gsm8k/exact_match.strict-match": 0.25,
                                        "gsm8k/exact_match.flexible-extract": 0.5,
                                        "arc_easy/acc": 0.75, "arc_easy/acc_norm": 1.0}
