"""Every PEFT variant trains on CPU, and its saved adapter reloads with peft to the trained logits."""

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from soup.models.load import apply_peft, build_model
from soup.models.tokenizer import build_byte_tokenizer
from tests.conftest import compose_config, run_in_process

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora", "vera", "olora", "pissa"])
def test_variant_adapter_reloads_to_the_trained_logits(variant, tmp_path):
    overrides = ["debug=tiny", f"peft={variant}", "optim.lr=1e-2", "train.max_steps=4", "train.save_every_steps=4"]
    run_in_process(tmp_path, overrides)
    cfg = compose_config(overrides)
    tokenizer = build_byte_tokenizer()
    ids = torch.tensor([tokenizer("<|im_start|>user\nAdd 3 and 4.<|im_end|>\n")["input_ids"]])

    # The trained model: the same init (seeded) plus the checkpoint's trained tensors.
    trained = apply_peft(build_model(cfg.model, tokenizer, cfg.seed), cfg.peft, cfg.seed).eval()
    checkpoint = load_file(str(tmp_path / "checkpoints" / "step-4" / "model.safetensors"))
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for name, tensor in checkpoint.items():
            params[name].copy_(tensor)
        expected = trained(ids).logits
        reloaded = PeftModel.from_pretrained(build_model(cfg.model, tokenizer, cfg.seed), tmp_path / "final").eval()
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
        untouched = build_model(cfg.model, tokenizer, cfg.seed)(ids).logits
        assert not torch.allclose(expected, untouched, atol=1e-4), "training changed nothing"


def test_lora_on_unfrozen_layers_only(tmp_path):
    run_in_process(tmp_path, ["debug=tiny", "peft=lora", "peft.freeze_layers=1"])
    adapter = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert adapter and all(".layers.1." in name for name in adapter)


def test_neftune_run_differs_from_a_clean_run(tmp_path):
    run_in_process(tmp_path / "clean", ["debug=tiny"])
    run_in_process(tmp_path / "noisy", ["debug=tiny", "train.neftune_alpha=5"])
    clean = load_file(str(tmp_path / "clean" / "final" / "model.safetensors"))
    noisy = load_file(str(tmp_path / "noisy" / "final" / "model.safetensors"))
    assert any(not torch.equal(clean[k], noisy[k]) for k in clean)
