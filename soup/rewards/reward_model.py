"""A reward model as a reward: a local sequence-classification model scores prompt + completion.

    task.reward=[accuracy, runs/rm/final]      # an entry that is a directory

    reward[i] = model(prompt[i] + completion[i]).logits[0, 0]      # one scalar per completion

The directory is a Hugging Face model saved with save_pretrained: config.json with
num_labels=1, weights for every parameter (the score head included), and its tokenizer.
`prompt` is the prompt exactly as the policy saw it (chat template applied), so the model
reads the whole exchange. The score is the single logit at the position the model's own
pooling picks: the last real token for decoders (Llama, Qwen, ...), [CLS] for encoders.

Texts go through in batches of `batch_size`, right-padded (every row's positions start at 0,
as in an unbatched forward) and cut to the model's max length from the left: the end of
the completion, where a decoder reads its score, is kept. A literal BOS at the start of the
prompt text is dropped when the tokenizer adds its own, so the model never sees two.

Each directory loads once per process (cached by resolved path), when the reward is bound:
fp32, eval mode, no grad, on CPU unless a caller asks for another device. A bad directory
fails there, before any generation; a NaN or inf score ends the run with a RewardError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soup.errors import ConfigError, SoupError
from soup.rewards.registry import Reward, RewardError

PARAMS = ("batch_size",)


@dataclass
class RewardModel:
    """A loaded reward model. `model` may be moved (`.to("cuda")`); `score` follows it."""

    model: torch.nn.Module
    tokenizer: Any
    max_length: int | None
    bos_to_strip: str | None  # the BOS text the tokenizer adds itself, or None

    @torch.no_grad()
    def score(self, texts: list[str], batch_size: int = 16) -> list[float]:
        """One float per text: logits[:, 0] of the model, [len(texts)]."""
        device = next(self.model.parameters()).device
        bos = self.bos_to_strip
        texts = [text[len(bos):] if bos and text.startswith(bos) else text for text in texts]
        scores: list[float] = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt",
                                   truncation=self.max_length is not None, max_length=self.max_length)
            logits = self.model(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device)).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores


_LOADED: dict[Path, RewardModel] = {}  # resolved directory -> its model, loaded once per process


def load_reward_model(path: str | Path, device: str | torch.device | None = None) -> RewardModel:
    """The reward model in directory `path`, loaded once per process (later calls share it).

    device: where to put it; None keeps it where it is (CPU on first load).
    ConfigError, naming the path and the fix, when the directory is not a usable reward model.
    """
    directory = Path(path).expanduser().resolve()
    if directory not in _LOADED:
        _LOADED[directory] = _load(str(path), directory)
    loaded = _LOADED[directory]
    if device is not None:
        loaded.model.to(device)
    return loaded


def reward_model_reward(path: str, *, batch_size: int = 16) -> Reward:
    """The reward named `path` in task.reward: the model's score of prompt + completion."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"task.reward={path}: batch_size must be a whole number >= 1 (got {batch_size!r}).\n"
                          "  fix: set batch_size=16, or smaller if scoring runs out of memory.")
    reward_model = load_reward_model(path)

    def call(completions: list[str], **columns: list[Any]) -> list[float]:
        if "prompt" not in columns:
            raise SoupError(f"reward model {path} needs the column 'prompt' (the text the policy was given).\n"
                            "  fix: pass prompt=[...] with one prompt per completion.")
        values = reward_model.score([p + c for p, c in zip(columns["prompt"], completions)], batch_size)
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise RewardError(f"reward model {path} scored completion {i} as {value} "
                                  f"({completions[i][:60]!r}).\n  fix: check the model's weights for NaN/inf "
                                  "(score one text by hand); retrain or re-save it in float32.",
                                  reward=path, index=i)
        return values

    return Reward(name=path, columns=("prompt",), fn=call,
                  doc=f"reward model {path}: its score (logits[:, 0]) of prompt + completion")


def _load(path: str, directory: Path) -> RewardModel:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    def refuse(problem: str, fix: str) -> ConfigError:
        return ConfigError(f"task.reward={path}: {problem}\n  fix: {fix}")

    save_hint = "save the reward model with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
    if not (directory / "config.json").is_file():
        raise refuse(f"the directory has no config.json (looked in {directory}), so it is not a saved model.",
                     f"give the directory of a sequence-classification model: {save_hint}")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise refuse(f"its config.json does not load ({type(exc).__name__}: {exc}).", save_hint) from exc
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise refuse(f"model type '{config.model_type}' cannot be loaded as sequence classification.",
                     "use an architecture with a *ForSequenceClassification class (Llama, Qwen2, BERT, ...).")
    if config.num_labels != 1:
        raise refuse(f"a reward model has one output; this one has {config.num_labels} labels.",
                     "train (or re-save) it with num_labels=1: one scalar score per text.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise refuse(f"its tokenizer does not load ({type(exc).__name__}: {exc}).", save_hint) from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise refuse("the tokenizer has no pad token and no eos token to pad with, so texts cannot be batched.",
                         "set tokenizer.pad_token (e.g. add a '<pad>' token) and save the tokenizer again.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            directory, config=config, dtype=torch.float32, trust_remote_code=False, local_files_only=True,
            output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise refuse(f"the model does not load ({type(exc).__name__}: {exc}).", save_hint) from exc
    if info["missing_keys"]:
        # A causal LM's directory loads too, with a freshly initialised head: random rewards.
        raise refuse(f"the checkpoint has no weights for {', '.join(sorted(info['missing_keys']))}; "
                     "they would start random.", "give a trained reward model, not a base or causal LM.")
    # The model's pooling finds the last real token as the last one that is not pad_token_id.
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.eval().requires_grad_(False)
    text_config = model.config.get_text_config()
    limits = [n for n in (tokenizer.model_max_length, getattr(text_config, "max_position_embeddings", None))
              if isinstance(n, int) and n < 1_000_000]
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return RewardModel(model, tokenizer, max_length=min(limits) if limits else None,
                       bos_to_strip=bos if adds_bos else None)
