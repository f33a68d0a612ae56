"""Memory and speed features in real runs: each is live, and the exact ones change nothing but
memory (those run in process, the rest through the CLI)."""

import contextlib
import io
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, run_in_process

pytestmark = pytest.mark.slow

BASE = ["debug=tiny", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
        "data.val_split=0"]


def train(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    proc = run_cli(*BASE, *overrides, f"hydra.run.dir={run_dir}")
    return run_dir, proc.stdout


def train_in_process(tmp_path, name, *overrides):
    """train() without a new interpreter: for the features that act on the model they are given."""
    run_dir, out = tmp_path / name, io.StringIO()
    with contextlib.redirect_stdout(out):
        run_in_process(run_dir, [*BASE, *overrides])
    return run_dir, out.getvalue()


def weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir, _ = train_in_process(tmp_path_factory.mktemp("base"), "none")
    return run_dir


@pytest.mark.parametrize("overrides", [
    ["checkpointing=full"], ["checkpointing=medium"], ["checkpointing=selective"], ["checkpointing=auto"],
    ["offload=disk"], ["checkpointing=medium", "offload=disk"], ["kernels=chunked_ce", "kernels.ce_chunk_size=64"],
])
def test_exact_memory_features_train_the_same_weights(baseline, tmp_path, overrides):
    run_dir, out = train_in_process(tmp_path, "feature", *overrides)
    expected = weights(baseline)
    for name, tensor in weights(run_dir).items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-5, msg=name)
    assert any(word in out for word in ("checkpointing:", "offload:", "loss: LM head"))
    assert not (run_dir / "offload_scratch").exists() or not any((run_dir / "offload_scratch").iterdir())


@pytest.mark.parametrize("quant", ["fp8", "int8_qat"])
def test_low_precision_training_is_live(baseline, tmp_path, quant):
    run_dir, out = train(tmp_path, quant, f"quant={quant}")
    assert quant in out
    assert losses(run_dir) != losses(baseline)
    assert abs(losses(run_dir)[-1] - losses(baseline)[-1]) < 0.2


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_int8_qat_leaves_a_converted_final_that_loads_quantised(tmp_path, weight_bits):
    pytest.importorskip("torchao")
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from transformers import AutoModelForCausalLM

    run_dir, out = train(tmp_path, "qat", "quant=int8_qat", f"quant.qat_weight_bits={weight_bits}",
                         "train.max_steps=2")
    assert f"converted 14 fake-quantised linear layers to int{weight_bits} weights" in out
    assert (run_dir / "final" / "README.md").exists()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, IntxUnpackedToInt8Tensor)
    # int8 storage either way; int4 weights use only [-8, 7] of it.
    assert (int(weight.qdata.abs().max()) <= 8) == (weight_bits == 4)
    ids = torch.arange(5, 29).reshape(2, 12)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("overrides, expect", [
    (["quant=int8_qat", "quant.qat_weight_bits=3"], "quant.qat_weight_bits=3; valid: 8, 4"),
    (["quant.qat_weight_bits=4"], "quant.qat_weight_bits"),
])
def test_qat_weight_bits_is_checked_at_config_load(tmp_path, overrides, expect):
    proc = run_cli(*BASE, *overrides, f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and expect in proc.stderr


def test_cpu_offload_is_rejected_on_a_cpu_machine(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the rule is for machines without CUDA")
    proc = run_cli(*BASE, "offload=cpu", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "offload=disk" in proc.stderr


def test_kernels_auto_logs_its_choice_and_timings(tmp_path):
    _, out = train(tmp_path, "auto", "kernels=auto", "train.max_steps=2")
    line = next(l for l in out.splitlines() if "kernels: auto" in l)
    assert "none=" in line and "ms" in line


@pytest.mark.parametrize("overrides,expect", [
    (["data.packing=true"], "cross-document attention allowed"),
    (["data.packing=true", "data.packing_cross_doc_attn_mask=true"], "cross-document attention masked"),
    (["data.packing=true", "data.packing_cross_doc_attn_mask=true", "model.attn_implementation=eager"], "masked"),
    (["data.multipack=true"], "multipack (packed:"),
    (["data.multipack=true", "data.multipack_layout=padded"], "multipack (padded:"),
])
def test_packing_and_multipack_train_and_report_efficiency(tmp_path, overrides, expect):
    run_dir, out = train_in_process(tmp_path, "packed", *overrides, "data.val_split=0.1", "train.eval_every_steps=3")
    assert expect in out
    assert "efficiency" in out
    assert all(loss == loss for loss in losses(run_dir))  # finite, not NaN
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stats"]["trained_tokens"] > 0


def test_packing_without_the_flag_is_rejected_at_config_load(tmp_path):
    proc = run_cli(*BASE, "data.packing_cross_doc_attn_mask=true", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "data.packing=true" in proc.stderr
