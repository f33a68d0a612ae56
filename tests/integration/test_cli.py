"""The CLI end to end, as a user runs it."""

import json
import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def read_metrics(run_dir: Path, split: str) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["split"] == split]


def test_default_run_trains_offline_and_writes_the_run_directory(tmp_path):
    """`python -m soup.train` with no overrides besides where to write."""
    run_cli(f"hydra.run.dir={tmp_path}", "train.progress_bar=false", timeout=600)
    train, evals = read_metrics(tmp_path, "train"), read_metrics(tmp_path, "eval")
    assert len(train) == 150 and [e["step"] for e in evals] == [50, 100, 150]
    assert evals[-1]["loss"] < evals[0]["loss"] < train[0]["loss"]
    for key in ("loss", "lr", "grad_norm", "trained_tokens", "trained_tokens_per_s", "peak_memory_mb"):
        assert key in train[0]
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["stats"]["status"] == "finished" and record["stats"]["trained_tokens_per_s"] > 0
    assert record["packages"]["torch"] and record["data_files"][0]["sha256"]
    assert record["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["stats"]["precision"] == {"requested": "fp32", "resolved": "fp32"}
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-100", "step-150"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert model(ids).logits.shape[-1] == len(tokenizer)


def test_precision_auto_is_resolved_once_logged_and_recorded(tmp_path):
    from soup.precision import resolve_precision

    proc = run_cli("debug=tiny", "train.device=cpu", "train.precision=auto", f"hydra.run.dir={tmp_path}")
    resolved = resolve_precision("auto", torch.device("cpu"))  # this machine, as the run saw it
    assert f"[soup] precision: auto -> {resolved} (CPU {torch.backends.cpu.get_cpu_capability()} " in proc.stdout
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["stats"]["precision"] == {"requested": "auto", "resolved": resolved}
    assert record["config"]["train"]["precision"] == resolved  # every reader after the resolution saw this
    assert record["device"]["cpu_native_bf16"] == (resolved == "bf16")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="ONEDNN_MAX_CPU_ISA names x86 ISAs")
def test_bf16_on_a_cpu_without_a_fast_bf16_path_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    # oneDNN held to AVX2 runs bf16 as an AVX2-only CPU does: torch's fallback kernel, ~100x slower than fp32.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("SOUP_ALLOW_SLOW_BF16", raising=False)
    proc = run_cli("debug=tiny", "train.device=cpu", "train.precision=bf16", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "train.precision=auto" in proc.stderr and "100x slower" in proc.stderr
    assert not (tmp_path / "run.json").exists()


def test_pretrain_task_runs_on_the_demo_documents(tmp_path):
    run_cli("task=pretrain", "debug=tiny", f"hydra.run.dir={tmp_path}")
    assert len(read_metrics(tmp_path, "train")) == 6
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_multirun_runs_each_job_in_its_own_directory(tmp_path):
    proc = run_cli("--multirun", "debug=tiny", "optim.lr=1e-4,3e-3", f"hydra.sweep.dir={tmp_path}",
                   "hydra.sweep.subdir=${hydra.job.num}")
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"], proc.stdout
    lrs = [json.loads((job / "run.json").read_text())["config"]["optim"]["lr"] for job in jobs]
    assert lrs == [1e-4, 3e-3]
    assert all((job / "final" / "model.safetensors").exists() for job in jobs)


def test_a_failing_job_does_not_end_the_sweep(tmp_path):
    # data.max_length=8 leaves no trained token in any row: job 0 fails with a message, job 1 trains.
    proc = run_cli("--multirun", "debug=tiny", "data.max_length=8,128", f"hydra.sweep.dir={tmp_path}",
                   "hydra.sweep.subdir=${hydra.job.num}")
    assert "data.max_length" in proc.stderr
    assert not (tmp_path / "0" / "final").exists()
    assert (tmp_path / "1" / "final" / "model.safetensors").exists()


def test_lora_adapter_reloads_with_peft_and_gives_the_same_logits(tmp_path):
    run_cli("debug=tiny", "peft=lora", "optim.lr=1e-2", f"hydra.run.dir={tmp_path}")
    final = tmp_path / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()

    from omegaconf import OmegaConf
    from peft import PeftModel

    from soup.models.load import apply_peft, build_model
    from soup.models.tokenizer import build_byte_tokenizer

    cfg = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    tokenizer = build_byte_tokenizer()
    base = build_model(cfg.model, tokenizer, cfg.seed)
    reloaded = PeftModel.from_pretrained(base, final).eval()
    # The trained adapter must differ from a fresh one (so this test can fail).
    fresh = apply_peft(build_model(cfg.model, tokenizer, cfg.seed), cfg.peft, cfg.seed).eval()
    ids = torch.tensor([tokenizer("<|im_start|>user\nReverse the word cat<|im_end|>\n")["input_ids"]])

    trained_adapter = load_file(str(final / "adapter_model.safetensors"))
    assert any(name.endswith("lora_B.weight") and t.abs().sum() > 0 for name, t in trained_adapter.items())
    checkpoint = load_file(str(sorted((tmp_path / "checkpoints").iterdir())[-1] / "model.safetensors"))
    with torch.no_grad():
        for name, param in fresh.named_parameters():
            if name in checkpoint:
                param.copy_(checkpoint[name])
        assert torch.allclose(reloaded(ids).logits, fresh(ids).logits, atol=1e-6)
        assert not torch.allclose(reloaded(ids).logits, build_model(cfg.model, tokenizer, cfg.seed)(ids).logits)


def test_tensorboard_tracker_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    run_cli("debug=tiny", "tracker=tensorboard", f"hydra.run.dir={tmp_path}")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_tracker_works_offline(tmp_path):
    pytest.importorskip("wandb")
    run_cli("debug=tiny", "tracker=wandb", f"hydra.run.dir={tmp_path}")
    assert list((tmp_path / "wandb").glob("offline-run-*"))
