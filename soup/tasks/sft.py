"""Supervised fine-tuning: next-token loss on the labelled (response) tokens."""

from __future__ import annotations

import torch

from soup.losses.sft import count_trained_tokens, next_token_loss_sum
from soup.tasks.base import Task, TaskOutput


class SFTTask(Task):
    unit_name = "tokens"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_trained_tokens(batch["labels"])

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, _ = next_token_loss_sum(logits, batch["labels"])
        return TaskOutput(loss_sum=loss_sum)
