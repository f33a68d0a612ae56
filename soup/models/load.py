"""Build the tokenizer and model a config asks for, with PEFT applied.

model=tiny: a randomly initialised Llama (shape from model.tiny) and the built-in
byte tokenizer, seeded so the same config gives the same weights.
model=hf: AutoModelForCausalLM.from_pretrained(model.path).

The head on the backbone follows the task (HEADS): next-token logits for the language-model
tasks, one score per sequence for a reward model, two classes per token for a process
reward model, none for sentence embeddings (the backbone's hidden states). A new head starts
from the seeded init; a directory that already holds that head (a trained reward model) loads it.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                          LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase)

from soup.errors import ConfigError
from soup.models.adapters import apply_peft  # noqa: F401  (re-exported: the model build's last step)
from soup.models.files import model_source
from soup.models.tokenizer import build_byte_tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# head -> (the transformers auto class, what its config adds)
HEADS = {
    "causal_lm": (AutoModelForCausalLM, {}),
    "sequence_score": (AutoModelForSequenceClassification, {"num_labels": 1}),
    "token_classes": (AutoModelForTokenClassification, {"num_labels": 2}),
    # The bare backbone, its hidden states the output (task=embedding pools them).
    "encoder": (AutoModel, {}),
}


def head_spec(head) -> tuple[type, dict]:
    """(auto class, config kwargs) of a task's head: a HEADS name, or (name, extra config kwargs)
    when the task sizes the head from its data (task=classifier: num_labels, the class names)."""
    if isinstance(head, str):
        return HEADS[head]
    name, extra = head
    auto_class, config = HEADS[name]
    return auto_class, {**config, **extra}


def build_tokenizer(model_cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer. The first thing a run loads, so it checks the model folder too."""
    if model_cfg.name == "hf":
        model_source(model_cfg.path, needs_tokenizer=not model_cfg.tokenizer_path)
    if model_cfg.tokenizer_path:
        source = model_source(model_cfg.tokenizer_path, "model.tokenizer_path", needs_weights=False)
        return load_tokenizer(source, model_cfg.trust_remote_code)
    if model_cfg.name == "tiny":
        return build_byte_tokenizer()
    return load_tokenizer(model_source(model_cfg.path, needs_weights=False), model_cfg.trust_remote_code)


def load_kwargs(model_cfg: DictConfig) -> dict:
    """The from_pretrained arguments every load of this model takes (plain or quantised)."""
    kwargs = {"dtype": DTYPES[model_cfg.dtype], "attn_implementation": model_cfg.attn_implementation}
    if model_cfg.name == "hf":
        kwargs["trust_remote_code"] = model_cfg.trust_remote_code
    return kwargs


def build_model(model_cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                head: str = "causal_lm") -> PreTrainedModel:
    auto_class, head_config = head_spec(head)
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.name == "tiny":
        arch = model_cfg.tiny
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            num_hidden_layers=arch.num_hidden_layers,
            num_attention_heads=arch.num_attention_heads,
            num_key_value_heads=arch.num_key_value_heads,
            max_position_embeddings=arch.max_position_embeddings,
            rope_theta=arch.rope_theta,
            tie_word_embeddings=arch.tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **head_config,
        )
        # The init draws from the global generator: fork it so building a model does
        # not shift the random stream the rest of the run sees.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto_class.from_config(config, attn_implementation=model_cfg.attn_implementation, dtype=dtype)
        return model
    try:
        # The new head's init draws from the global generator: seeded, and the stream forked.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = auto_class.from_pretrained(model_source(model_cfg.path, needs_tokenizer=False),
                                               **head_config, **load_kwargs(model_cfg))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.path={model_cfg.path!r}: could not load a {auto_class.__name__.removeprefix('AutoModelFor')} "
            f"model: {exc}\n  fix: point model.path at a transformers model directory (config.json + weights)."
        ) from exc
    if head != "causal_lm" and model.config.pad_token_id is None:
        # The score sits on the last token that is not padding: the model must know the padding.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
