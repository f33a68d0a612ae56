"""Real weights: Karpathy's stories260K Llama from ../shared/models, real data from ../shared/data."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import ModelConfig
from soup.models.load import build_model, build_tokenizer
from tests.conftest import require_shared, run_in_process

pytestmark = [pytest.mark.slow, pytest.mark.shared]

DOCUMENTED_CONTINUATION = ", there was a little girl named Lily. She loved to play outside in the park."


def hf_model_cfg(path):
    cfg = OmegaConf.structured(ModelConfig)
    cfg.name, cfg.path = "hf", str(path)
    return cfg


def test_stories260k_loads_through_model_hf_and_continues_as_documented():
    path = require_shared("models/stories260k")
    cfg = hf_model_cfg(path)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer, seed=0).eval()
    assert sum(p.numel() for p in model.parameters()) == 260_032  # tied embeddings counted once
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id == 1
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    continuation = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert continuation.startswith(DOCUMENTED_CONTINUATION), continuation


def test_sft_on_real_instructions_lowers_stories260k_validation_loss(tmp_path):
    model = require_shared("models/stories260k")
    data = require_shared("data/sft/self_instruct_seed_tasks.alpaca.jsonl")
    run_in_process(tmp_path, ["model=hf", f"model.path={model}", "data=file", f"data.train_file={data}",
                              "data.chat_template=chatml", "data.max_length=256", "data.overlong=drop",
                              "data.val_split=0.2", "train.max_steps=30", "train.micro_batch_size=8",
                              "train.grad_accum_steps=1", "train.eval_every_steps=15", "train.eval_at_start=true",
                              "train.save_every_steps=0", "optim.lr=2e-3", "train.progress_bar=false"])
    evals = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if m["split"] == "eval"]
    assert [e["step"] for e in evals] == [0, 15, 30]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3, evals
