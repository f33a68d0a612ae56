"""python -m soup.generate (soup/generate.py): batch mode writes one row per prompt in input
order, reproducibly by seed, and at temperature 0 the greedy decoding computed here by hand;
an adapter checkpoint generates what its merged model generates; the chat streams its replies
over a scripted stdin with history, the system prompt and /reset, sampling what batch mode
samples; bad input ends with exit status 2 and the file:line or flag."""

import io
import json

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO_ROOT, compose_config, run_cli, run_in_process

pytestmark = pytest.mark.slow

# conf/debug/tiny.yaml's model (debug=tiny itself also shrinks data and train, which generate has not)
TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=2",
        "model.tiny.num_attention_heads=2", "model.tiny.num_key_value_heads=1"]
# The byte tokenizer's </s> and <|im_end|> (soup/models/tokenizer.py: ids 2 and 4)
STOP_IDS = {2, 4}
PROMPTS = [
    {"prompt": "Say hi."},
    {"prompt": [{"role": "user", "content": "Reverse cat."}]},
    # an SFT row: its final assistant turn is the one generated
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                  {"role": "assistant", "content": "5"}]},
    {"prompt": "Spell dog in capitals, then stop."},
    {"prompt": "x"},
]
# The same prompts through ChatML with its generation prompt, written out by hand
RENDERED = [
    "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nReverse cat.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nSpell dog in capitals, then stop.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n",
]


def compose_generate(overrides: list[str]):
    """The config `python -m soup.generate <overrides>` composes."""
    from hydra import compose, initialize_config_dir

    from soup.generate_config import register_generate_configs

    register_generate_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        return compose(config_name="generate", overrides=list(overrides))


def run_generate(run_dir, overrides: list[str], stdin=None):
    from soup.generate import generate

    return generate(compose_generate(overrides), run_dir, overrides, stdin=stdin)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def greedy_row(model, tokenizer, text: str, max_new_tokens: int) -> dict:
    """The output row greedy decoding gives: argmax of a full forward per token, no cache, no batch."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    completion = []
    while len(completion) < max_new_tokens and not (completion and completion[-1] in STOP_IDS):
        completion.append(int(model(torch.tensor([ids + completion])).logits[0, -1].argmax()))
    return {"completion": tokenizer.decode(completion, skip_special_tokens=True),
            "finish_reason": "stop" if completion[-1] in STOP_IDS else "length", "tokens": len(completion)}


def test_batch_mode_writes_each_prompt_in_order_and_at_temperature_0_decodes_greedily(tmp_path):
    from soup.models.load import build_model
    from soup.models.tokenizer import build_byte_tokenizer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    # batches of 2 mix prompt lengths, so left padding is in play
    result = run_generate(tmp_path / "run", [*TINY, f"prompts_file={prompts}", "temperature=0", "max_new_tokens=12",
                                             "batch_size=2"])
    rows = read_jsonl(tmp_path / "run" / "generations.jsonl")  # the default output_file
    assert result.output_file == tmp_path / "run" / "generations.jsonl" and result.rows == len(PROMPTS)
    assert [row["prompt"] for row in rows] == ["Say hi.", PROMPTS[1]["prompt"], PROMPTS[2]["messages"][:2],
                                               "Spell dog in capitals, then stop.", "x"]
    tokenizer = build_byte_tokenizer()
    model = build_model(compose_generate(TINY).model, tokenizer, seed=42).eval()  # model=tiny's weights at seed=42
    for row, text in zip(rows, RENDERED):
        assert {k: row[k] for k in ("completion", "finish_reason", "tokens")} == greedy_row(model, tokenizer, text, 12)
    assert result.completion_tokens == sum(row["tokens"] for row in rows)


def test_sampling_is_reproducible_by_seed(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    common = [*TINY, f"prompts_file={prompts}", "temperature=1.0", "top_k=50", "max_new_tokens=8"]
    outputs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run_generate(tmp_path / name, [*common, f"seed={seed}", f"output_file={tmp_path / f'{name}.jsonl'}"])
        outputs[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["c"]


def test_max_rows_takes_the_first_rows(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    run_generate(tmp_path / "run", [*TINY, f"prompts_file={prompts}", "max_rows=2", "max_new_tokens=1"])
    rows = read_jsonl(tmp_path / "run" / "generations.jsonl")
    assert [row["prompt"] for row in rows] == ["Say hi.", PROMPTS[1]["prompt"]]
    assert [row["tokens"] for row in rows] == [1, 1]


def test_an_adapter_checkpoint_generates_what_its_merged_model_generates(tmp_path):
    from peft import PeftModel

    from soup.errors import SoupError
    from soup.merge import load_base, merge
    from soup.models.tokenizer import build_byte_tokenizer

    overrides = ["debug=tiny", "peft=lora", "train.max_steps=2", "optim.lr=1e-2"]
    run_in_process(tmp_path / "run", overrides)
    final = tmp_path / "run" / "final"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:3])
    sampling = [f"prompts_file={prompts}", "temperature=0", "max_new_tokens=12"]

    # run_in_process writes no .hydra/, from which a model=tiny adapter's base is rebuilt
    with pytest.raises(SoupError) as missing_base:
        run_generate(tmp_path / "g0", [f"checkpoint={final}", *sampling])
    assert f"checkpoint={final}" in str(missing_base.value) and "fix: model=hf model.path=" in str(missing_base.value)

    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save(compose_config(overrides), tmp_path / "run" / ".hydra" / "config.yaml")
    run_generate(tmp_path / "g1", [f"checkpoint={final}", *sampling])
    merge(final, tmp_path / "merged")
    run_generate(tmp_path / "g2", [f"checkpoint={tmp_path / 'merged'}", *sampling])
    with_adapter = read_jsonl(tmp_path / "g1" / "generations.jsonl")
    merged = read_jsonl(tmp_path / "g2" / "generations.jsonl")
    assert with_adapter == merged and len(merged) == 3
    unmerged = PeftModel.from_pretrained(load_base(final, None), final).eval()  # the adapter as peft runs it
    expected = greedy_row(unmerged, build_byte_tokenizer(), RENDERED[0], 12)
    assert {k: with_adapter[0][k] for k in expected} == expected


def test_chat_streams_replies_keeps_history_and_resets(tmp_path, capsys):
    script = "Hi\nAdd 2 and 3.\n/reset\nHi\n/exit\nnever read\n"
    chat = [*TINY, "mode=chat", "max_new_tokens=10", "system_prompt=Be brief."]
    result = run_generate(tmp_path / "chat", [*chat, "temperature=0"], stdin=io.StringIO(script))
    shown = capsys.readouterr().out
    system, hi = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}
    first, second, after_reset = result.turns  # /exit ended it: the last line was not read
    assert first.messages == [system, hi]
    assert second.messages == [system, hi, {"role": "assistant", "content": first.reply},
                               {"role": "user", "content": "Add 2 and 3."}]
    assert after_reset.messages == first.messages and after_reset.reply == first.reply
    assert "history cleared" in shown and all(turn.reply in shown for turn in result.turns)

    # The streaming loop samples what the rollout engine samples for the same conversation:
    # greedily, and at temperature 1 from the same seed (one prompt per batch).
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": second.messages}])
    run_generate(tmp_path / "batch", [*TINY, f"prompts_file={prompts}", "temperature=0", "max_new_tokens=10"])
    assert read_jsonl(tmp_path / "batch" / "generations.jsonl")[0]["completion"] == second.reply
    sampled = run_generate(tmp_path / "chat1", [*chat, "temperature=1.0", "seed=3"], stdin=io.StringIO("Hi\n"))
    prompts = write_jsonl(tmp_path / "hi.jsonl", [{"messages": sampled.turns[0].messages}])
    run_generate(tmp_path / "batch1", [*TINY, f"prompts_file={prompts}", "temperature=1.0", "seed=3",
                                       "max_new_tokens=10", "batch_size=1"])
    assert read_jsonl(tmp_path / "batch1" / "generations.jsonl")[0]["completion"] == sampled.turns[0].reply


def test_bad_prompts_name_the_file_line_or_flag_and_exit_2(tmp_path):
    from soup.errors import DataError

    with pytest.raises(DataError) as missing:
        run_generate(tmp_path / "r0", [*TINY, f"prompts_file={tmp_path / 'absent.jsonl'}"])
    assert "prompts_file=" in str(missing.value) and "fix:" in str(missing.value)

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"text": "no prompt here"}])
    proc = run_cli(*TINY, f"prompts_file={prompts}", f"hydra.run.dir={tmp_path / 'run'}", module="soup.generate",
                   check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"[soup] error: {prompts}:2: the row has neither `prompt` nor `messages`" in proc.stderr
    assert "fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "generations.jsonl").exists()
