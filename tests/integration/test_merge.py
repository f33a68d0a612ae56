"""python -m soup.merge: the merged model's logits equal the adapter model's."""

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM

from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


# lora, and pissa whose adapter is converted at save; DoRA merges through the same PeftModel call.
@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_merged_model_equals_the_adapter_model(variant, tmp_path):
    run_cli("debug=tiny", f"peft={variant}", "optim.lr=1e-2", f"hydra.run.dir={tmp_path / 'run'}")
    run_cli("--adapter", str(tmp_path / "run" / "final"), "--out", str(tmp_path / "merged"), module="soup.merge")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())

    cfg = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    tokenizer = build_byte_tokenizer()
    adapter_model = PeftModel.from_pretrained(build_model(cfg.model, tokenizer, cfg.seed),
                                              tmp_path / "run" / "final").eval()
    ids = torch.tensor([tokenizer("<|im_start|>user\nReverse the word cat<|im_end|>\n")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_merge_without_an_adapter_names_the_fix(tmp_path):
    proc = run_cli("--adapter", str(tmp_path), "--out", str(tmp_path / "m"), module="soup.merge", check=False)
    assert proc.returncode == 2 and "adapter_config.json" in proc.stderr


def test_trust_remote_code_reaches_the_base_load_from_the_flag_or_the_run(tmp_path, monkeypatch):
    import json as json_module

    import transformers

    from soup.merge import load_base

    seen = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kwargs: seen.append(kwargs["trust_remote_code"]))
    adapter = tmp_path / "run" / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json_module.dumps({"base_model_name_or_path": "some/base"}))
    load_base(adapter, None)
    load_base(adapter, None, trust_remote_code=True)
    (tmp_path / "run" / ".hydra").mkdir()
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("model:\n  trust_remote_code: true\n")
    load_base(adapter, None)
    assert seen == [False, True, True]
