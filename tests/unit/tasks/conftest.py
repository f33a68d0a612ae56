"""Fixtures the online-RL task tests share."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from soup.models.tokenizer import build_byte_tokenizer


@pytest.fixture
def model_and_tokenizer():
    """A random tiny Llama (seeded) and the byte tokenizer: completions are noise, the bookkeeping is what is checked."""
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config), tokenizer
