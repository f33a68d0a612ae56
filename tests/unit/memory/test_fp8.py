"""fp8 (emulated on CPU) and int8 QAT: the right layers converted, the numerics live but close, training steps;
QAT's converted model computes what the fake-quantised one did, and final/ loads back into it."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

pytest.importorskip("torchao")

from torchao.float8.float8_linear import Float8Linear  # noqa: E402
from torchao.quantization import IntxUnpackedToInt8Tensor  # noqa: E402
from torchao.quantization.qat import FakeQuantizedLinear  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from soup.config.schema import ModelConfig  # noqa: E402
from soup.errors import ConfigError  # noqa: E402
from soup.memory.fp8 import (FP8_RECIPES, apply_fp8, apply_int8_qat, convert_qat, fp8_eligible,  # noqa: E402
                              fp8_support, save_qat_final)
from soup.models.load import build_model  # noqa: E402
from soup.models.tokenizer import build_byte_tokenizer  # noqa: E402

CPU = torch.device("cpu")
# 2 blocks x (q, k, v, o, gate, up, down); all dims (32, 16, 64) divisible by 16 and by 32
# for in_features; the LM head (vocab 261) is never converted.
LINEARS_PER_BLOCK = 7


def tiny_llama(num_layers=2, intermediate_size=64):
    cfg = OmegaConf.structured(ModelConfig)
    cfg.merge_with({"name": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": intermediate_size,
                                             "num_hidden_layers": num_layers, "num_attention_heads": 2,
                                             "num_key_value_heads": 1}})
    return build_model(cfg, build_byte_tokenizer(), seed=0)


def batch(rows=2, seq=24, seed=0):
    ids = torch.randint(5, 250, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def loss_of(model, b):
    return model(**b, use_cache=False).loss


def sgd_step_changes_weights(model, b):
    weights = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in weights]
    loss = loss_of(model, b)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in weights)
    torch.optim.SGD(weights, lr=0.1).step()
    return torch.isfinite(loss).item() and all(not torch.equal(a, p) for a, p in zip(before, weights))


# --- fp8 -------------------------------------------------------------------------------


def test_fp8_support_on_cpu_is_emulated_with_a_warning():
    ok, note = fp8_support(CPU)
    assert ok and "emulated on CPU" in note


@pytest.mark.parametrize("capability, supported", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_support_on_cuda_needs_capability_8_9(monkeypatch, capability, supported):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    ok, reason = fp8_support(torch.device("cuda"))
    assert ok == supported
    if not supported:
        assert f"{capability[0]}.{capability[1]}" in reason and "8.9" in reason


def test_fp8_refuses_a_gpu_below_8_9_before_converting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test A100")
    model = tiny_llama()
    with pytest.raises(ConfigError, match="8.0"):
        apply_fp8(model, "tensorwise", torch.device("cuda"))
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_converts_every_block_linear_but_not_the_head(recipe):
    model = tiny_llama()
    line = apply_fp8(model, recipe, CPU)
    converted = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert len(converted) == 2 * LINEARS_PER_BLOCK
    assert not isinstance(model.lm_head, Float8Linear)
    assert f"{2 * LINEARS_PER_BLOCK} linear layers" in line and recipe in line and "emulated" in line


@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_loss_is_live_but_close_and_a_step_trains(recipe):
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    apply_fp8(model, recipe, CPU)
    b = batch()
    with torch.no_grad():
        fp32_loss, fp8_loss = loss_of(reference, b).item(), loss_of(model, b).item()
    # float8 e4m3 keeps 3 mantissa bits: the loss moves (the option is on) but by far
    # less than the ~5.6 nats of a random 261-way guess.
    assert fp8_loss != fp32_loss
    assert abs(fp8_loss - fp32_loss) < 0.05
    assert sgd_step_changes_weights(model, b)


def test_fp8_tensorwise_linear_matches_a_hand_rounded_matmul():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 16, bias=False))
    x = torch.randn(4, 32)
    w = layer[0].weight.detach().clone()
    apply_fp8(layer, "tensorwise", CPU)

    def round_trip(t):
        # Tensorwise dynamic scaling: the tensor's absmax maps to e4m3's largest value, 448.
        scale = 448.0 / t.abs().max()
        return (t * scale).to(torch.float8_e4m3fn).float() / scale

    expected = round_trip(x) @ round_trip(w).T
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, x @ w.T, rtol=1e-5, atol=1e-6)


def test_fp8_skips_linears_whose_dims_are_not_multiples_of_16():
    assert fp8_eligible(nn.Linear(32, 48), head=None)
    assert not fp8_eligible(nn.Linear(24, 32), head=None)
    assert not fp8_eligible(nn.Linear(32, 40), head=None)
    head = nn.Linear(32, 32)
    assert not fp8_eligible(head, head=head)


def test_fp8_rejects_a_model_without_eligible_linears():
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 8))
    with pytest.raises(ConfigError, match="no linear layer float8 can train"):
        apply_fp8(model, "tensorwise", CPU)


def test_fp8_rejects_an_unknown_recipe():
    with pytest.raises(ConfigError, match="quant.fp8_recipe='blockwise'"):
        apply_fp8(tiny_llama(), "blockwise", CPU)


# --- int8 QAT ----------------------------------------------------------------------------


def test_qat_fake_quantises_block_linears_with_int8_activations_and_int8_weight_groups_by_default():
    model = tiny_llama()
    line = apply_int8_qat(model, group_size=32)
    fake = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    assert len(fake) == 2 * LINEARS_PER_BLOCK
    assert not isinstance(model.lm_head, FakeQuantizedLinear)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.activation_fake_quantizer.config.dtype == torch.int8
    assert layer.weight_fake_quantizer.config.dtype == torch.int8
    assert layer.weight_fake_quantizer.config.granularity.group_size == 32
    assert "14 linear layers fake-quantised" in line and "int8 weights" in line


@pytest.mark.parametrize("weight_bits, levels", [(8, 256), (4, 16)])
def test_qat_weight_bits_sets_the_grid_each_weight_group_is_rounded_to(weight_bits, levels):
    # Symmetric intN weights in groups of 32 input features: after fake quantisation a
    # group holds at most 2**N distinct values. Random fp32 weights hold 32 distinct
    # values per group, so int4 (16 levels) must merge some, while int8 keeps more than
    # any 4-bit grid could.
    model = tiny_llama()
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    apply_int8_qat(model, group_size=32, weight_bits=weight_bits)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        fq = layer.weight_fake_quantizer(layer.weight)
    distinct = [len(torch.unique(group)) for group in fq.reshape(-1, 32)]
    assert max(distinct) <= levels
    if weight_bits == 4:
        assert max(distinct) < 32
    else:
        assert max(distinct) > 16
    # Rounding to the group's grid moves a weight by at most half a step, step = absmax / (2**(N-1) - 0.5).
    step = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / (2 ** (weight_bits - 1) - 0.5)
    assert ((fq - w).reshape(-1, 32).abs() <= step / 2 + 1e-7).all()


def test_qat_weight_bits_changes_the_forward_and_int8_stays_closer_to_full_precision():
    reference = tiny_llama()
    int8, int4 = copy.deepcopy(reference), copy.deepcopy(reference)
    apply_int8_qat(int8, group_size=32, weight_bits=8)
    apply_int8_qat(int4, group_size=32, weight_bits=4)
    b = batch()
    with torch.no_grad():
        plain, out8, out4 = (m(**b, use_cache=False).logits for m in (reference, int8, int4))
    assert not torch.equal(out8, out4)
    assert (out8 - plain).abs().max() < (out4 - plain).abs().max()


@pytest.mark.parametrize("weight_bits", [4, 8])
def test_qat_outputs_are_live_but_close_and_a_step_trains(weight_bits):
    reference = tiny_llama()
    model = copy.deepcopy(reference)
    apply_int8_qat(model, group_size=32, weight_bits=weight_bits)
    b = batch()
    with torch.no_grad():
        plain, fake = reference(**b, use_cache=False), model(**b, use_cache=False)
    assert not torch.equal(plain.logits, fake.logits)
    assert abs(plain.loss.item() - fake.loss.item()) < 0.05
    assert sgd_step_changes_weights(model, b)


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_convert_after_qat_keeps_the_fake_quantised_numerics(weight_bits):
    model = tiny_llama()
    apply_int8_qat(model, group_size=32, weight_bits=weight_bits)
    b = batch()
    with torch.no_grad():
        fake = model(**b, use_cache=False).logits
        line = convert_qat(model)
        real = model(**b, use_cache=False).logits
    assert not any(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, IntxUnpackedToInt8Tensor)
    assert f"converted 14 fake-quantised linear layers to int{weight_bits}" in line
    # The converted layer dequantises the same integers with the same scales and runs the
    # same fp32 matmul on the same fake-quantised activations: equal up to float rounding.
    torch.testing.assert_close(real, fake, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_saved_qat_final_loads_back_quantised_with_the_same_outputs(tmp_path, weight_bits):
    # intermediate 48: down_proj (in_features 48) is not a multiple of the group, stays fp32.
    model = tiny_llama(intermediate_size=48)
    apply_int8_qat(model, group_size=32, weight_bits=weight_bits)
    b = batch()
    with torch.no_grad():
        fake = model(**b, use_cache=False).logits
    line = save_qat_final(model, tmp_path)
    with torch.no_grad():
        converted = model(**b, use_cache=False).logits
    assert "converted 12" in line and "README.md" in line

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    mlp = loaded.model.layers[1].mlp
    assert isinstance(mlp.up_proj.weight, IntxUnpackedToInt8Tensor)
    assert not isinstance(mlp.down_proj.weight, IntxUnpackedToInt8Tensor)
    assert not isinstance(loaded.lm_head.weight, IntxUnpackedToInt8Tensor)
    assert mlp.up_proj.weight.qdata.dtype == torch.int8
    assert int(mlp.up_proj.weight.qdata.abs().max()) <= 2 ** (weight_bits - 1)
    with torch.no_grad():
        back = loaded(**b, use_cache=False).logits
    # The loaded tensors are the saved ones bit for bit: outputs match exactly.
    torch.testing.assert_close(back, converted, rtol=0, atol=0)
    torch.testing.assert_close(back, fake, rtol=1e-5, atol=1e-5)

    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "torchao"
    assert set(quant["modules_to_not_convert"]) == {"lm_head", "model.layers.0.mlp.down_proj",
                                                    "model.layers.1.mlp.down_proj"}
    readme = (tmp_path / "README.md").read_text()
    assert f"int{weight_bits} weights in groups of 32" in readme and "AutoModelForCausalLM.from_pretrained" in readme


def test_qat_rejects_a_model_without_eligible_linears():
    with pytest.raises(ConfigError, match="qat_group_size=32"):
        apply_int8_qat(nn.Sequential(nn.Linear(24, 40)), group_size=32)


def test_convert_qat_needs_a_prepared_model():
    with pytest.raises(ConfigError, match="apply_int8_qat first"):
        convert_qat(tiny_llama())
