"""bitsandbytes base weights on CPU: QLoRA and 8-bit LoRA train; the options change the computation."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import QuantConfig
from soup.models.quant import bnb_config, quantize_built_model
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

WIDE = ["debug=tiny", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128"]


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantised_base_trains_through_lora_on_cpu(quant, tmp_path):
    out = run_cli(*WIDE, f"quant={quant}", "peft=lora", "optim.lr=1e-2", "train.max_steps=8",
                  f"hydra.run.dir={tmp_path}").stdout
    assert f"quant: {quant}" in out
    losses = train_losses(tmp_path)
    assert losses[-1] < losses[0]
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_full_fine_tune_of_quantised_weights_is_rejected(tmp_path):
    proc = run_cli(*WIDE, "quant=4bit", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "peft=lora" in proc.stderr


def test_narrow_layers_are_refused_on_cpu_with_the_fix(tmp_path):
    proc = run_cli("debug=tiny", "quant=4bit", "peft=lora", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "multiple of 64" in proc.stderr


def test_quant_options_reach_bitsandbytes_and_change_the_logits():
    from soup.config.schema import ModelConfig
    from soup.models.load import build_model
    from soup.models.tokenizer import build_byte_tokenizer

    cfg = OmegaConf.structured(QuantConfig)
    cfg.name, cfg.quant_type, cfg.double_quant = "4bit", "fp4", False
    config = bnb_config(cfg)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4" and not config.bnb_4bit_use_double_quant

    model_cfg = OmegaConf.structured(ModelConfig)
    model_cfg.name, model_cfg.tiny.hidden_size, model_cfg.tiny.intermediate_size = "tiny", 64, 128
    tokenizer = build_byte_tokenizer()
    ids = torch.randint(5, 200, (1, 12))
    logits = {}
    for quant_type in ("nf4", "fp4"):
        cfg.quant_type = quant_type
        model = quantize_built_model(build_model(model_cfg, tokenizer, 0), cfg, torch.device("cpu"))
        model.train()  # bitsandbytes' eval-only CPU repacking is not what training runs
        with torch.no_grad():
            logits[quant_type] = model(ids).logits
    full = build_model(model_cfg, tokenizer, 0)(ids).logits
    assert not torch.allclose(logits["nf4"], logits["fp4"])
    assert not torch.allclose(logits["nf4"], full) and torch.allclose(logits["nf4"], full, atol=0.5)
