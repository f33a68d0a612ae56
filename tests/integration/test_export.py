"""python -m soup.export: a GGUF that transformers (and llama.cpp) load back as the model it came from.

Round trip of the real stories260k (../shared; tied embeddings, 8 heads / 4 KV heads, a
sentencepiece-style tokenizer), exported and loaded back with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, logits compared on the three
PROMPTS (48 positions x 512 classes). Measured on this 2-core CPU (gguf 0.19.0, transformers 5.24):

    type   max |logit diff|   / max |logit|   argmax agreement   mean KL(source || gguf), nats
    f32    0.0                0.0             100%               0.0
    f16    0.0113             5.5e-4          100%               5.9e-7
    q8_0   0.246              1.2e-2          100%               2.7e-4

llama-cpp-python 0.3.36 (when installed) runs the f32 file: 20 greedy tokens equal transformers'
(max logit difference 9.5e-3 on stories260k, 1.4e-4 on the byte-tokenizer model), and
tokenizes like the source tokenizer, special tokens included.

Tolerances: f32 equal to 1e-5 (the same float32 weights; the q/k permutation only moves rows);
f16 within 1% of the largest logit; q8_0 (ffn_down stays f16: its 172-value rows are not whole
32-value blocks) at least 95% next-token argmax agreement and mean KL below 0.02 nats.
"""

import hashlib
import itertools
import json
import shutil

import pytest
import torch

from soup.export import main, permute_for_llama_cpp
from tests.conftest import require_shared, run_in_process

PROMPTS = ["Once upon a time, there was a little girl named Lily.", "The cat sat on the mat and",
           "Tom and his mom went to the park. They saw a big dog."]
SENTENCE = "Lily liked to play with her red ball in the garden."


def export(*args) -> None:
    """python -m soup.export <args>, in this process, succeeding.

    gguf is imported first so that, when it is not installed, the test meets a ModuleNotFoundError,
    which tests/conftest.py turns into a skip (a failure under SOUP_REQUIRE_EXTRAS=1)."""
    import gguf  # noqa: F401

    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = require_shared("models/stories260k")
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits_of(model, tokenizer) -> torch.Tensor:
    """[positions, vocab]: the logits of every PROMPTS position, prompts one after another."""
    with torch.no_grad():
        return torch.cat([model(**tokenizer(p, return_tensors="pt")).logits[0] for p in PROMPTS])


def round_trip_figures(source: torch.Tensor, exported: torch.Tensor) -> dict:
    """The figures in the module docstring, from [positions, vocab] logits of the source model and its GGUF."""
    diff = (source - exported).abs().max().item()
    log_p, log_q = source.log_softmax(-1), exported.log_softmax(-1)
    return {"max_abs": diff, "relative": diff / source.abs().max().item(),
            "argmax_agreement": (source.argmax(-1) == exported.argmax(-1)).float().mean().item(),
            "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()}


@pytest.mark.parametrize("type_name", ["f32", "f16", "q8_0"])
def test_the_gguf_loads_back_as_the_source_model(type_name, stories, tmp_path):
    folder, source, tokenizer = stories
    out = tmp_path / "model.gguf"
    export("--model", folder, "--out", out, "--type", type_name)
    model, gguf_tokenizer = load_gguf(out)

    assert gguf_tokenizer(SENTENCE)["input_ids"] == tokenizer(SENTENCE)["input_ids"]
    figures = round_trip_figures(logits_of(source, tokenizer), logits_of(model, tokenizer))
    if type_name == "f32":
        assert figures["max_abs"] <= 1e-5, figures
    elif type_name == "f16":
        assert figures["relative"] <= 1e-2, figures
    else:
        assert figures["argmax_agreement"] >= 0.95 and figures["kl"] <= 0.02, figures


def test_the_file_holds_llama_cpp_names_metadata_and_types(stories, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "model.gguf"
    export("--model", stories[0], "--out", out, "--type", "q8_0")
    reader = GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}

    def field(key):
        return reader.fields[key].contents()

    # tied embeddings: no output.weight (llama.cpp and transformers then use token_embd)
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"
    assert {f"blk.4.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                           "ffn_down", "attn_norm", "ffn_norm")} <= types.keys()
    assert len(types) == 2 + 5 * 9  # token_embd, output_norm, 9 per block
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == "F32"  # 1-D stays f32
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # 172-value rows: not whole 32-value q8_0 blocks

    assert field("general.architecture") == "llama"
    assert (field("llama.context_length"), field("llama.embedding_length"), field("llama.block_count"),
            field("llama.feed_forward_length"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv"), field("llama.rope.dimension_count"),
            field("llama.vocab_size")) == (512, 64, 5, 172, 8, 4, 8, 512)
    assert field("llama.rope.freq_base") == 10000.0
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field("tokenizer.ggml.model") == "llama"
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False
    tokens, token_types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    # <unk> UNKNOWN (2), <s> </s> CONTROL (3), byte tokens BYTE (6), as sentencepiece types them
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and token_types[:4] == [2, 3, 3, 6]


def test_permute_interleaves_each_heads_halves():
    # two heads of dimension 4: transformers rotates rows (0, 2) and (1, 3) of a head together,
    # llama.cpp rotates adjacent rows, so each head's rows go 0, 2, 1, 3
    rows = torch.arange(8.0).reshape(8, 1)
    assert permute_for_llama_cpp(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.fixture
def byte_model(tmp_path):
    """(folder, model, tokenizer): an untied tiny Llama with soup's byte tokenizer (no merges, a chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from soup.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    # rope_theta and rms_norm_eps away from stories260k's, so their round trip shows in the logits
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model", model, tokenizer


CHAT_TEXT = "<|im_start|>user\nReverse the word cat, é<|im_end|>\n"


def test_an_untied_byte_tokenizer_model_with_a_chat_template_round_trips(byte_model, tmp_path):
    from gguf import GGUFReader

    folder, source, tokenizer = byte_model
    out = tmp_path / "gguf" / "tiny.gguf"
    export("--model", folder, "--out", out, "--type", "f32")

    model, gguf_tokenizer = load_gguf(out)
    assert gguf_tokenizer(CHAT_TEXT)["input_ids"] == tokenizer(CHAT_TEXT)["input_ids"]
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert "output.weight" in {t.name for t in GGUFReader(out).tensors}
    ids = torch.tensor([tokenizer(CHAT_TEXT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=1e-5)


def test_the_model_card_names_task_base_data_hash_and_eval_loss(tmp_path, capsys):
    from soup.model_card import write_card_if_from_run

    run_dir = tmp_path / "run"
    run_in_process(run_dir, ["debug=tiny", "train.max_steps=2"])
    out = tmp_path / "export" / "model.gguf"
    export("--model", run_dir / "final", "--out", out, "--type", "f16")

    card = (out.parent / "README.md").read_text()
    record = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval_loss = [row for row in rows if row["split"] == "eval"][-1]["loss"]
    assert "task `sft`" in card and "tiny Llama" in card and "model.gguf (f16)" in card
    assert hashlib.sha256(open(record["data_files"][0]["path"], "rb").read()).hexdigest() in card
    assert f"final eval loss: {last_eval_loss:.4f}" in card

    # A merged model is no run's final/: the card soup.merge writes into it names the run.
    merged = tmp_path / "merged"
    shutil.copytree(run_dir / "final", merged)
    write_card_if_from_run(run_dir / "final", merged)
    export("--model", merged, "--out", merged / "model.gguf", "--type", "f32")
    assert "model.gguf (f32)" in (merged / "README.md").read_text()

    # A README.md that soup did not write is kept, and the export refused before any work.
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "README.md").write_text("# their model\n")
    capsys.readouterr()
    assert main(["--model", str(merged), "--out", str(tmp_path / "theirs" / "model.gguf")]) == 2
    assert "--no-card" in capsys.readouterr().err and not (tmp_path / "theirs" / "model.gguf").exists()


@pytest.mark.parametrize("setup, out_name, args, expected", [
    ("qwen2", "m.gguf", [], ["the architecture is qwen2", "convert_hf_to_gguf.py"]),
    ("adapter", "m.gguf", [], ["peft adapter", "python -m soup.merge"]),
    ("llama", "m.gguf", ["--type", "q4_k"], ["--type q4_k", "f32, f16, q8_0"]),
    ("llama", "m.gguf", ["--run", "nowhere"], ["--run nowhere", "--no-card"]),
    ("llama", "m.bin", [], ["must end in .gguf"]),
], ids=["not-llama", "adapter", "unsupported-type", "not-a-run", "not-gguf"])
def test_user_mistakes_name_the_fix_and_exit_2(setup, out_name, args, expected, stories, tmp_path, capsys):
    import gguf  # noqa: F401  (not installed: a skip, as in export() above)

    folder = stories[0]
    if setup != "llama":
        folder = tmp_path / "model"
        folder.mkdir()
        if setup == "qwen2":
            config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
            (folder / "config.json").write_text(json.dumps(config))
        else:
            (folder / "adapter_config.json").write_text("{}")
    assert main(["--model", str(folder), "--out", str(tmp_path / out_name), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[soup] error: ") and "\n  fix: " in err and "Traceback" not in err
    assert all(text in err for text in expected), err


def test_llama_cpp_generates_what_transformers_generates(stories, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    folder, source, tokenizer = stories
    out = tmp_path / "model.gguf"
    export("--model", folder, "--out", out, "--type", "f32")
    ids = tokenizer("Once upon a time")["input_ids"]
    expected = source.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False)
    assert llm.tokenize(b"Once upon a time", add_bos=True) == ids
    greedy = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0)
    assert list(itertools.islice(greedy, 20)) == expected


def test_llama_cpp_reads_the_byte_tokenizer_and_its_chat_template(byte_model, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    folder, source, tokenizer = byte_model
    out = tmp_path / "tiny.gguf"
    export("--model", folder, "--out", out, "--type", "f32")

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, logits_all=True)
    ids = tokenizer(CHAT_TEXT)["input_ids"]
    assert llm.tokenize(CHAT_TEXT.encode(), add_bos=False, special=True) == ids
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    llm.eval(ids)
    with torch.no_grad():
        expected = source(torch.tensor([ids])).logits[0]
    # llama.cpp's own kernels: close, not equal (measured: max difference 1.4e-4 here)
    torch.testing.assert_close(torch.tensor(llm.scores[:len(ids)]), expected, atol=2e-3, rtol=0)
