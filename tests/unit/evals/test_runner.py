"""The kinds of soup/evals/runner.py, each scored against values worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from soup.errors import DataError
from soup.evals import runner
from soup.evals.likelihood import continuation_logprobs, split_tokens
from soup.evals.runner import EvalContext, lower_is_better, run_suite
from soup.evals.suite import read_suite
from tests.conftest import compose_config

CPU = torch.device("cpu")
# GSM8K-format rows with hand-written completions: the reference is GSM8K's own solution
# ("... #### N"), the completion any way a model ends (####, \boxed{}, prose, cut off).
GSM8K_ROWS = [
    ("Natalia sold 48 clips in April and half as many in May. How many in all?",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
     "In May she sold 24, so 48 + 24 = 72.\n#### 72", 1.0, "72"),
    ("Weng earns $12 an hour. How much for 50 minutes?",
     "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
     "She earns $0.2 a minute, so the answer is $10.", 1.0, "$10"),
    ("A robe takes 2 bolts of blue fiber and half that much white. How many bolts in total?",
     "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total is 2+1=<<2+1=3>>3 bolts\n#### 3",
     "2 blue and 1 white: \\boxed{3}", 1.0, "3"),
    ("Josh buys a house for $80,000 and puts in $50,000 of repairs. Its value rises 150%. Profit?",
     "The cost was 80,000+50,000=$<<80000+50000=130000>>130,000\n...\n#### 70000",
     "The profit is \\boxed{70,000} dollars.", 1.0, "70,000"),
    ("James runs 3 sprints 3 times a week, 60 meters each. Meters a week?",
     "He sprints 3*3=<<3*3=9>>9 times\nSo he runs 9*60=<<9*60=540>>540 meters\n#### 540",
     "9 sprints of 60 m is 520 m.\n#### 520", 0.0, "520"),
    ("Every day Wendi feeds each of her 20 chickens 3 cups. How many cups in the final meal?",
     "...\n#### 20", "The final meal needs \\boxed{2", 0.0, None),  # cut off inside the box: no answer
    ("Kylar buys 16 glasses; every second one costs 60% of $5. Total?",
     "...\n#### 64", "I am not sure how to solve this.", 0.0, None),
    ("Toulouse has twice as many sheep as Charleston, which has 4 times Seattle's 20. Total?",
     "...\n#### 260", "Seattle 20, Charleston 80, Toulouse 160: 20 + 80 + 160 = 260.", 1.0, "260"),
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def suite_of(tmp_path: Path, body: str):
    (tmp_path / "suite.yaml").write_text("tasks:\n" + body)
    return read_suite(str(tmp_path / "suite.yaml"))


def no_model():
    raise AssertionError("the model was loaded, and every task scores given completions")


def test_gsm8k_format_completions_written_by_hand_score_exactly(tmp_path):
    write_rows(tmp_path / "gsm8k.jsonl", [{"question": q, "prompt": q, "answer": solution, "completion": completion}
                                          for q, solution, completion, _, _ in GSM8K_ROWS])
    suite = suite_of(tmp_path, "  gsm8k:\n    kind: generation\n    file: gsm8k.jsonl\n    scorer: answer\n"
                               "    completion_column: completion\n")
    (result,) = run_suite(suite, EvalContext(no_model, None, CPU), log=lambda line: None)
    assert result.metrics == {"accuracy": 5 / 8}
    assert [s["score"] for s in result.samples] == [row[3] for row in GSM8K_ROWS]
    assert [s["extracted"] for s in result.samples] == [row[4] for row in GSM8K_ROWS]
    assert result.samples[0]["reference"].endswith("#### 72") and result.info == {"scored": 8, "scorer": "answer"}


def test_tool_calls_report_the_name_accuracy_beside_the_full_match(tmp_path):
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    write_rows(tmp_path / "tools.jsonl", [
        {"prompt": "Weather in Paris?", "call": call,
         "completion": '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>'},
        {"prompt": "Weather in Paris?", "call": call,
         "completion": '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon"}}</tool_call>'},
        {"prompt": "Weather in Paris?", "call": call, "completion": "It is sunny."},
    ])
    suite = suite_of(tmp_path, "  tools:\n    kind: generation\n    file: tools.jsonl\n    scorer: tool_call\n"
                               "    reference_column: call\n    completion_column: completion\n")
    (result,) = run_suite(suite, EvalContext(no_model, None, CPU), log=lambda line: None)
    assert result.metrics == {"accuracy": 1 / 3, "name_accuracy": 2 / 3}


def test_a_row_without_its_reference_is_named(tmp_path):
    write_rows(tmp_path / "rows.jsonl", [{"prompt": "1+1?", "answer": "2", "completion": "2"},
                                         {"prompt": "2+2?", "completion": "4"}])
    suite = suite_of(tmp_path, "  sums:\n    kind: generation\n    file: rows.jsonl\n"
                               "    completion_column: completion\n")
    with pytest.raises(DataError, match=r"rows.jsonl:2.*no `answer` column"):
        run_suite(suite, EvalContext(no_model, None, CPU), log=lambda line: None)


def test_multiple_choice_reads_every_answer_form_and_normalises_by_characters(tmp_path, monkeypatch):
    # Summed log-likelihoods chosen so the longest choice wins on the sum and loses per character.
    scripted = {" a": -3.0, " bb": -4.0, " cccccccc": -2.0}
    monkeypatch.setattr(runner, "continuation_logprobs", lambda model, tok, pairs, batch_size: [
        type("S", (), {"logprob": scripted[cont]}) for _, cont in pairs])
    choices = ["a", "bb", "cccccccc"]
    write_rows(tmp_path / "mc.jsonl", [{"question": "q1", "choices": choices, "answer": 2},        # index
                                       {"question": "q2", "choices": choices, "answer": "A"},      # letter
                                       {"question": "q3", "choices": choices, "answer": "bb"}])    # text
    suite = suite_of(tmp_path, "  mc:\n    kind: multiple_choice\n    file: mc.jsonl\n")
    (result,) = run_suite(suite, EvalContext(lambda: None, None, CPU), log=lambda line: None)
    # sums pick "cccccccc" (index 2); per character: -3, -2, -0.25 -> also index 2
    assert [s["chosen"] for s in result.samples] == [2, 2, 2]
    assert result.metrics == {"acc": 1 / 3, "acc_norm": 1 / 3}
    write_rows(tmp_path / "bad.jsonl", [{"question": "q", "choices": choices, "answer": "Z"}])
    suite = suite_of(tmp_path, "  mc:\n    kind: multiple_choice\n    file: bad.jsonl\n")
    with pytest.raises(DataError, match="names none of the 3 choices"):
        run_suite(suite, EvalContext(lambda: None, None, CPU), log=lambda line: None)


@pytest.fixture(scope="module")
def tiny():
    from soup.models.load import build_model, build_tokenizer

    cfg = compose_config(["debug=tiny"]).model
    tokenizer = build_tokenizer(cfg)
    return build_model(cfg, tokenizer, seed=0).eval(), tokenizer


def test_a_continuation_scores_its_own_tokens_given_the_context_in_any_batch(tiny):
    model, tokenizer = tiny
    context_ids, continuation_ids = split_tokens(tokenizer, "The capital of France is ", "Paris")
    # the trailing space moved to the continuation: the same split as "...is" + " Paris"
    assert (context_ids, continuation_ids) == split_tokens(tokenizer, "The capital of France is", " Paris")
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    expected = sum(float(logprobs.detach()[len(context_ids) - 1 + i, token]) for i, token in enumerate(continuation_ids))
    pairs = [("The capital of France is", " Paris"), ("A much longer context that pads the batch", " x"),
             ("The capital of France is", " Paris")]
    alone, batched = continuation_logprobs(model, tokenizer, pairs[:1], 1), continuation_logprobs(model, tokenizer, pairs, 3)
    assert alone[0].logprob == pytest.approx(expected, abs=1e-4) and alone[0].tokens == len(continuation_ids)
    assert batched[0].logprob == pytest.approx(expected, abs=1e-4) == batched[2].logprob


def test_a_judge_scores_the_expected_rating_of_its_scale(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    write_rows(tmp_path / "rows.jsonl", [{"prompt": "Say hi.", "completion": "hi"},
                                         {"prompt": "Say bye.", "completion": "hello there"}])
    suite = suite_of(tmp_path, "  j:\n    kind: judge\n    file: rows.jsonl\n    judge: judge\n"
                               "    completion_column: completion\n    min_score: 1\n    max_score: 3\n"
                               '    rubric: "Request: {prompt}\\nReply: {completion}\\nScore 1-3:"\n')
    (result,) = run_suite(suite, EvalContext(no_model, tokenizer, CPU), log=lambda line: None)
    scores = []
    for sample in result.samples:
        question = f"Request: {sample['prompt']}\nReply: {sample['completion']}\nScore 1-3:"
        if isinstance(tokenizer.chat_template, str):
            question = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                     add_generation_prompt=True)
        delimiter = "" if question[-1].isspace() else " "
        pairs = [(question, f"{delimiter}{r}") for r in (1, 2, 3)]
        # a rendered template wrote its own special tokens
        templated = isinstance(tokenizer.chat_template, str)
        logprobs = [s.logprob for s in continuation_logprobs(model, tokenizer, pairs, 3, add_special_tokens=not templated)]
        weights = torch.tensor(logprobs).softmax(0)
        scores.append(float(sum(w * r for w, r in zip(weights.tolist(), (1, 2, 3)))))
        assert sum(sample["probabilities"].values()) == pytest.approx(1.0)
    assert [s["score"] for s in result.samples] == pytest.approx(scores)
    assert result.metrics["score"] == pytest.approx(sum(scores) / 2)
    assert result.metrics["score_normalised"] == pytest.approx((sum(scores) / 2 - 1) / 2)


def test_losses_and_perplexities_fall_as_the_model_improves_every_other_metric_rises():
    assert lower_is_better("heldout/loss") and lower_is_better("wiki/word_perplexity") and lower_is_better("x/ppl")
    assert not lower_is_better("gsm8k/accuracy") and not lower_is_better("arc/acc_norm")
    assert not lower_is_better("gsm8k/exact_match.strict-match")


def test_an_lm_eval_task_leaves_the_random_streams_and_the_model_mode_as_they_were(tmp_path, monkeypatch):
    # lm_eval reseeds python/numpy/torch and puts the model in eval mode; a gate inside a training
    # run must not see either, or the run would train differently with the gate than without it.
    import random

    from soup.evals import harness

    def reseeding(model, tokenizer, **kwargs):
        random.seed(kwargs["seed"])
        torch.manual_seed(kwargs["seed"])
        model.eval()
        return {"stories_mc/acc": 0.5, "stories_mc/acc_stderr": float("nan")}

    monkeypatch.setattr(harness, "run_lm_eval", reseeding)
    monkeypatch.setattr(harness, "check_lm_eval", lambda where: None)
    model = torch.nn.Linear(2, 2).train()
    suite = suite_of(tmp_path, "  mc:\n    kind: lm_eval\n    tasks: [stories_mc]\n    limit: 4\n")
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    (result,) = run_suite(suite, EvalContext(lambda: model, None, CPU, seed=0), log=lambda line: None)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert model.training and result.metrics == {"stories_mc/acc": 0.5}  # the NaN stderr is dropped


def test_an_empty_context_still_scores_the_continuations_first_token(tiny):
    model, tokenizer = tiny
    context_ids, continuation_ids = split_tokens(tokenizer, "", "Paris")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert context_ids == [start] and continuation_ids == tokenizer("Paris", add_special_tokens=False)["input_ids"]
    (score,) = continuation_logprobs(model, tokenizer, [("", "Paris")], 1)
    assert score.tokens == len(continuation_ids) and score.logprob < 0
