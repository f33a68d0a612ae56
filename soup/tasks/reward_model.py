"""task=reward_model: a Bradley-Terry reward model trained on preference pairs.

The decoder gets a score head (transformers' *ForSequenceClassification, num_labels=1):
the reward of prompt + completion is the head's logit at the sequence's last real token,
the position the model's own pooling picks, so a saved model scores texts alike when
AutoModelForSequenceClassification loads it, in the GRPO reward `task.reward=[<final dir>]`
and as PPO's reward. Pairs come from the readers and chat templates of the preference tasks;
a `margin` column (Llama 2) asks the chosen reward to lead by that much. The loss is
soup/losses/reward_model.py's, per pair; `task.center_rewards_coefficient` adds the
centring term. LoRA/QLoRA train the head fully beside the adapters (peft's SEQ_CLS).
"""

from __future__ import annotations

import torch

from soup.data.collate import collate_pairs
from soup.data.preference import build_preference_datasets
from soup.losses.reward_model import bradley_terry_loss
from soup.tasks.base import Task, TaskData, TaskOutput


class RewardModelTask(Task):
    unit_name = "pairs"
    model_head = "sequence_score"

    def build_data(self, cfg, tokenizer) -> TaskData:
        splits = build_preference_datasets(cfg.data, tokenizer, "paired", cfg.seed, margin=True)

        def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
            batch = collate_pairs(examples, tokenizer.pad_token_id)
            if examples and "margin" in examples[0]:
                batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
            return batch

        lines = [splits.report.summary()]
        if splits.val_report is not None:
            lines.append(splits.val_report.summary())
        if splits.train and "margin" in splits.train[0]:
            lines.append("reward margins: from the data's margin column")
        return TaskData(train=splits.train, val=splits.val, collate=collate, files=splits.files,
                        report=splits.report, val_report=splits.val_report, chat_template=splits.chat_template,
                        lines=lines)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2  # rows 0..B-1 chosen, B..2B-1 rejected

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        n = self.units(batch)
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        out = bradley_terry_loss(rewards[:n], rewards[n:], margin=batch.get("margin"),
                                 center_rewards_coefficient=self.cfg.center_rewards_coefficient)
        # Means over this micro-batch's pairs, weighted by them: the loop divides by the step's pairs.
        names = {"accuracy": "accuracy", "margin": "margin", "chosen_reward": "rewards/chosen",
                 "rejected_reward": "rewards/rejected"}
        sums = {names[key]: float(value) * n for key, value in out.metrics.items()}
        return TaskOutput(loss_sum=out.losses.sum(), metric_sums=sums)
