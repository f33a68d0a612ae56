"""Low-precision training of the linear layers with torchao: float8 training and int8 QAT.

fp8 (quant=fp8): each eligible nn.Linear becomes a torchao Float8Linear. Its three
matmuls (output, grad_input, grad_weight) take float8 operands scaled on the fly
(dynamic scaling; Micikevicius et al. 2022, https://arxiv.org/abs/2209.05433), while
the weights, optimizer state and everything outside the linears stay in high
precision. Recipes (torchao's names):

    tensorwise          one scale per tensor, e4m3 forward / e5m2 gradients; fastest.
    rowwise             one scale per row, e4m3 throughout, power-of-two scales.
    rowwise_with_gw_hp  rowwise, but grad_weight computed in high precision; most accurate.

Float8 matmuls need CUDA compute capability >= 8.9 (Ada, Hopper). On CPU torchao
emulates them (operands are cast to float8 and back, the matmul runs in fp32), so a
test sees the same rounding as the GPU path without its speed.

Eligible: an nn.Linear that is not the LM head (its logits feed the loss directly;
torchao's and torchtitan's float8 recipes also keep it in high precision) and whose
in/out features are both divisible by 16 (the float8 GEMM's layout constraint).

int8_qat (quant=int8_qat): quantisation-aware training (Jacob et al. 2018,
https://arxiv.org/abs/1712.05877). Each eligible linear is swapped for torchao's
FakeQuantizedLinear: int8 dynamic per-token asymmetric activations and int8 symmetric
weights in groups of `group_size` input features ("8da8w"; quant.qat_weight_bits=4
gives torchao's "8da4w", the scheme its Llama QAT recipe targets). Forward rounds to the
quantised grid and back; backward passes the gradient straight through (straight-through
estimator), so the weights learn to sit where rounding costs little. Evaluation during
training sees this fake-quantised model. At the end, `save_qat_final` runs `convert_qat`,
which swaps in real quantised weights with the same numerics (a test pins them equal),
and saves that converted model as final/. Eligible: an nn.Linear that is not the LM
head, with in_features divisible by `group_size`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from soup.errors import ConfigError, require

FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# The float8 GEMM (torch._scaled_mm) needs both matrix dims divisible by 16.
FP8_DIM_MULTIPLE = 16
# Float8 tensor cores first appear in compute capability 8.9 (Ada); Hopper is 9.0.
FP8_MIN_CAPABILITY = (8, 9)
CPU_EMULATION_NOTE = "emulated on CPU: for testing, not for speed"
QAT_WEIGHT_BITS = (4, 8)


def fp8_support(device: torch.device) -> tuple[bool, str]:
    """Whether float8 training can run on `device`, and why not (or a caveat).

    CUDA needs compute capability >= 8.9; CPU is supported through torchao's
    emulation, with the caveat as the message; other devices are unsupported.
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < FP8_MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            return False, (f"float8 matmuls need CUDA compute capability >= {FP8_MIN_CAPABILITY[0]}."
                           f"{FP8_MIN_CAPABILITY[1]} (Ada, Hopper or newer); {name} has {major}.{minor}. "
                           "fix: use quant=none, or train on an H100/L4/RTX 40xx-class GPU.")
        return True, ""
    if device.type == "cpu":
        return True, CPU_EMULATION_NOTE
    return False, (f"float8 training runs on CUDA (compute capability >= 8.9) or, emulated, on CPU; "
                   f"not on device type {device.type!r}.")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lm_head(model: nn.Module) -> nn.Module | None:
    base = _unwrapped(model)
    return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def fp8_eligible(module: nn.Module, head: nn.Module | None) -> bool:
    """A plain nn.Linear, not the LM head, with both dims divisible by 16."""
    # type() rather than isinstance: torchao's Float8Linear and FakeQuantizedLinear are
    # nn.Linear subclasses, and an already-converted layer must not be converted again.
    if type(module) is not nn.Linear or module is head:
        return False
    return module.in_features % FP8_DIM_MULTIPLE == 0 and module.out_features % FP8_DIM_MULTIPLE == 0


def apply_fp8(model: nn.Module, recipe: str, device: torch.device) -> str:
    """Convert the eligible linear layers of `model` (in place) to torchao float8 training.

    recipe: tensorwise | rowwise | rowwise_with_gw_hp. device: where training runs
    (CPU switches torchao to emulation). Call after the model is on `device`, before
    torch.compile and before the optimizer is built (the parameters stay the same
    objects, so an optimizer built earlier would still work; building it last keeps
    the order obvious).
    Returns a one-line summary for the run log.
    """
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"quant.fp8_recipe={recipe!r}; valid: {', '.join(FP8_RECIPES)}.")
    device = torch.device(device)
    ok, reason = fp8_support(device)
    if not ok:
        raise ConfigError(f"quant=fp8: {reason}")
    float8 = require("torchao.float8", package="torchao", extra="fp8", wanted_by="quant=fp8")

    head = _lm_head(model)
    linears = _linear_layers(model)
    eligible = [name for name, m in linears if fp8_eligible(m, head)]
    if not eligible:
        raise ConfigError(
            f"quant=fp8: {type(model).__name__} has no linear layer float8 can train ({len(linears)} nn.Linear, "
            f"none with both dims divisible by {FP8_DIM_MULTIPLE} apart from the LM head).\n"
            "  fix: use quant=none for this model."
        )
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    if device.type != "cuda":
        config = dataclasses.replace(config, emulate=True)
    float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: fp8_eligible(m, head))

    from torchao.float8.float8_linear import Float8Linear

    converted = sum(isinstance(m, Float8Linear) for m in model.modules())
    skipped = len(linears) - converted
    where = f", {CPU_EMULATION_NOTE}" if device.type != "cuda" else ""
    return (f"fp8: {converted} linear layers -> torchao Float8Linear (recipe={recipe}{where}); "
            f"{skipped} kept in high precision (LM head, dims not divisible by {FP8_DIM_MULTIPLE})")


def _qat_base_config(weight_bits: int, group_size: int):
    quantization = require("torchao.quantization", package="torchao", extra="fp8", wanted_by="quant=int8_qat")
    weight_dtype = {4: torch.int4, 8: torch.int8}[weight_bits]
    # The PTQ config the fake quantisation mimics: QATConfig derives int8 per-token
    # asymmetric activations and symmetric grouped weights from it, and convert applies it.
    return quantization.Int8DynamicActivationIntxWeightConfig(
        weight_dtype=weight_dtype, weight_granularity=quantization.PerGroup(group_size))


def apply_int8_qat(model: nn.Module, group_size: int = 32, weight_bits: int = 8) -> str:
    """Swap the eligible linear layers of `model` (in place) for fake-quantised ones.

    group_size: input features sharing one weight scale (a divisor of in_features;
    32-256 typical, smaller is more accurate). weight_bits: 8 (default, int8 weights)
    or 4 (torchao's 8da4w). Activations are always int8, dynamic per token. The
    parameters stay the same objects; call before torch.compile and before the
    optimizer is built.
    Returns a one-line summary for the run log.
    """
    if weight_bits not in QAT_WEIGHT_BITS:
        raise ConfigError(f"int8_qat weight_bits={weight_bits}; valid: {QAT_WEIGHT_BITS}.")
    if group_size <= 0:
        raise ConfigError(f"quant.qat_group_size={group_size} must be positive.")
    base_config = _qat_base_config(weight_bits, group_size)
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    head = _lm_head(model)

    def eligible(m: nn.Module, fqn: str = "") -> bool:
        return type(m) is nn.Linear and m is not head and m.in_features % group_size == 0

    linears = _linear_layers(model)
    n_eligible = sum(eligible(m) for _, m in linears)
    if not n_eligible:
        raise ConfigError(
            f"quant=int8_qat: {type(model).__name__} has no linear layer to fake-quantise ({len(linears)} nn.Linear, "
            f"none with in_features divisible by quant.qat_group_size={group_size} apart from the LM head).\n"
            "  fix: choose a quant.qat_group_size that divides the hidden size, or use quant=none."
        )
    quantize_(model, QATConfig(base_config, step="prepare"), filter_fn=eligible)
    return (f"int8_qat: {n_eligible} linear layers fake-quantised (int8 dynamic per-token activations, "
            f"int{weight_bits} weights in groups of {group_size}); "
            f"{len(linears) - n_eligible} kept in high precision (LM head, in_features not divisible by {group_size})")


def convert_qat(model: nn.Module) -> str:
    """After QAT: replace the fake-quantised linears (in place) with real quantised weights.

    The converted layers hold torchao IntxUnpackedToInt8Tensor weights (int8 storage of
    the intN values, with their scales) and compute what the fake-quantised forward
    computed. Meant for evaluation/export after training; not trainable.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    n_fake, weight_bits, group_size = _qat_scheme(model)
    base_config = _qat_base_config(weight_bits, group_size)
    quantize_(model, QATConfig(base_config, step="convert"), filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return f"int8_qat: converted {n_fake} fake-quantised linear layers to int{weight_bits} weights (group {group_size})"


def _qat_scheme(model: nn.Module) -> tuple[int, int, int]:
    """(fake-quantised layers, weight bits, group size) of a model apply_int8_qat prepared."""
    from torchao.quantization.qat import FakeQuantizedLinear

    fake = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    if not fake:
        raise ConfigError("convert_qat: the model has no fake-quantised layers; apply_int8_qat first.")
    schemes = {(m.weight_fake_quantizer.config.dtype, m.weight_fake_quantizer.config.granularity.group_size)
               for m in fake}
    if len(schemes) != 1:
        raise ValueError(f"convert_qat: layers were prepared with different weight schemes {sorted(map(str, schemes))}.")
    ((weight_dtype, group_size),) = schemes
    return len(fake), {torch.int4: 4, torch.int8: 8}[weight_dtype], group_size


QAT_LOAD_CODE = """from transformers import AutoModelForCausalLM, AutoTokenizer  # needs torchao installed
final_dir = "{final_dir}"  # this folder
model = AutoModelForCausalLM.from_pretrained(final_dir)
tokenizer = AutoTokenizer.from_pretrained(final_dir)"""


def save_qat_final(model: nn.Module, final_dir: str | Path) -> str:
    """End of a QAT run: convert `model` in place (convert_qat) and save it to `final_dir`.

    The converted linears hold torchao tensor subclasses, which plain safetensors cannot
    store. transformers' torchao integration can: with the PTQ config the fake
    quantisation mimicked recorded as the model's quantization_config (and the matching
    TorchAoHfQuantizer attached, as from_pretrained attaches it when it quantises),
    save_pretrained splits each torchao tensor into plain tensors plus metadata in
    model.safetensors and writes the config into config.json. from_pretrained rebuilds the
    same tensor subclasses from them: the model loads already quantised (QAT_LOAD_CODE),
    with outputs equal to the converted model's. Also writes final_dir/README.md with that
    code. Returns the run-log line.
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    _, weight_bits, group_size = _qat_scheme(model)
    converted = convert_qat(model)
    # Every linear left a plain nn.Linear (the LM head, in_features not divisible by the
    # group size) is named, so the saved config says what stayed in high precision.
    kept = [name for name, m in _linear_layers(model) if not isinstance(m.weight, IntxUnpackedToInt8Tensor)]
    quantization_config = TorchAoConfig(quant_type=_qat_base_config(weight_bits, group_size),
                                        modules_to_not_convert=kept)
    model.config.quantization_config = quantization_config
    model.hf_quantizer = TorchAoHfQuantizer(quantization_config)
    model.save_pretrained(final_dir)
    load_code = QAT_LOAD_CODE.format(final_dir=Path(final_dir).resolve())
    (Path(final_dir) / "README.md").write_text(
        f"# Converted QAT model (quant=int8_qat)\n\n"
        f"The linear layers hold torchao int{weight_bits} weights in groups of {group_size} input features and "
        f"quantise their inputs to int8 per token at run time: the model quantisation-aware training targeted, "
        f"computing what the fake-quantised model computed during training. High precision: "
        f"{', '.join(kept) or 'none'}.\n\nLoad it with:\n\n```python\n{load_code}\n```\n")
    return f"{converted}; final/ loads with transformers' from_pretrained + torchao (see final/README.md)"
