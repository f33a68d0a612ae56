"""Supervised fine-tuning: next-token loss on the labelled (response) tokens.

The LM head runs only on positions that carry a label. kernels.cut_ce picks how the
head meets the loss: `off` projects the selected positions and applies cross-entropy;
`chunked` (soup/memory/chunked_ce.py) and `cce` (the cut-cross-entropy package) never
hold the [tokens x vocab] logits at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soup.distributed import unwrap
from soup.losses.sft import count_trained_tokens
from soup.tasks.base import Task, TaskData, TaskOutput
from soup.tasks.logps import head_logits, labelled_hidden_states
from soup.tasks.token_data import build_token_data


class SFTTask(Task):
    unit_name = "tokens"

    def __init__(self, task_cfg, kernels_cfg=None):
        super().__init__(task_cfg)
        self.cut_ce = kernels_cfg.cut_ce if kernels_cfg is not None else "off"
        self.chunk_size = kernels_cfg.ce_chunk_size if kernels_cfg is not None else 512

    def build_data(self, cfg, tokenizer) -> TaskData:
        return build_token_data(cfg, tokenizer)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_trained_tokens(batch["labels"])

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        hidden, targets, _ = labelled_hidden_states(model, batch)
        if self.cut_ce == "off":
            return TaskOutput(loss_sum=F.cross_entropy(head_logits(model, hidden), targets, reduction="sum"))
        head = unwrap(model).get_output_embeddings()
        softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        if self.cut_ce == "chunked":
            from soup.memory.chunked_ce import linear_cross_entropy
        else:
            from soup.memory.chunked_ce import cce_linear_cross_entropy as linear_cross_entropy
        loss_sum, _ = linear_cross_entropy(hidden, head.weight, targets, bias=head.bias,
                                           chunk_size=self.chunk_size, softcap=softcap)
        return TaskOutput(loss_sum=loss_sum)
