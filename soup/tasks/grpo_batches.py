"""Groups of completions as the GRPO task moves them: split from a rollout, kept in the
replay buffer, stacked again (from rollouts of different widths) and cut into micro-batches.

A group is a dict of tensors with G rows (one prompt's completions): prompt_ids and
prompt_mask left-padded, completion_ids, completion_mask, sampler_logps right-padded,
advantages (G,); a group from the replay buffer also holds the old_logps of the policy
that sampled it and from_replay=True.
"""

from __future__ import annotations

import torch

ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampler_logps", "advantages")


def split_groups(batch: dict[str, torch.Tensor], group_size: int, pad_id: int) -> list[dict]:
    """One dict per group of `group_size` consecutive rows."""
    rows = batch["prompt_ids"].shape[0]
    return [{key: batch[key][start:start + group_size] for key in ROW_KEYS} for start in range(0, rows, group_size)]


def _pad(tensors: list[torch.Tensor], width: int, value, left: bool) -> torch.Tensor:
    padded = []
    for t in tensors:
        filler = t.new_full((t.shape[0], width - t.shape[1]), value)
        padded.append(torch.cat([filler, t] if left else [t, filler], dim=1))
    return torch.cat(padded)


def stack_groups(groups: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of every group, prompts left-padded and completions right-padded to common widths.
    old_logps is zero and replayed False on rows from fresh groups."""
    prompt_width = max(g["prompt_ids"].shape[1] for g in groups)
    width = max(g["completion_ids"].shape[1] for g in groups)
    olds = [g["old_logps"] if "old_logps" in g else torch.zeros_like(g["sampler_logps"]) for g in groups]
    return {
        "prompt_ids": _pad([g["prompt_ids"] for g in groups], prompt_width, pad_id, left=True),
        "prompt_mask": _pad([g["prompt_mask"] for g in groups], prompt_width, 0, left=True),
        "completion_ids": _pad([g["completion_ids"] for g in groups], width, pad_id, left=False),
        "completion_mask": _pad([g["completion_mask"] for g in groups], width, 0, left=False),
        "sampler_logps": _pad([g["sampler_logps"] for g in groups], width, 0.0, left=False),
        "old_logps": _pad(olds, width, 0.0, left=False),
        "advantages": torch.cat([g["advantages"] for g in groups]),
        "replayed": torch.cat([torch.full((g["advantages"].shape[0],), bool(g.get("from_replay")))
                               for g in groups]).to(groups[0]["advantages"].device),
    }


def micro_batches(stacked: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Model inputs (prompt + completion, positions counting real tokens only) in micro-batches of `size` rows."""
    ids = torch.cat([stacked["prompt_ids"], stacked["completion_ids"]], dim=1)
    # The completion's padding stays visible to nothing after it: it is never a query that trains.
    mask = torch.cat([stacked["prompt_mask"], torch.ones_like(stacked["completion_mask"])], dim=1)
    full = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            **{k: v for k, v in stacked.items() if k not in ("prompt_ids", "prompt_mask")}}
    return [{k: v[i:i + size] for k, v in full.items()} for i in range(0, ids.shape[0], size)]


class ReplayBuffer:
    """The `capacity` most informative groups seen (priority: the std of their rewards), drawn
    with probability proportional to it to stand in for a fresh group whose rewards were all
    equal (GRPO with a replay buffer, as in TRL's experimental GRPOWithReplayBuffer)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.groups: list[dict] = []

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: dict) -> None:
        stored = {**{k: v.detach().cpu().clone() for k, v in group.items() if torch.is_tensor(v)},
                  "priority": float(group["priority"])}
        if len(self.groups) < self.capacity:
            self.groups.append(stored)
            return
        weakest = min(range(len(self.groups)), key=lambda i: self.groups[i]["priority"])
        if stored["priority"] > self.groups[weakest]["priority"]:
            self.groups[weakest] = stored

    def draw(self, generator: torch.Generator, device: torch.device) -> dict:
        weights = torch.tensor([g["priority"] for g in self.groups], dtype=torch.float64)
        stored = self.groups[int(torch.multinomial(weights, 1, generator=generator))]
        return {**{k: v.to(device) if torch.is_tensor(v) else v for k, v in stored.items()}, "from_replay": True}

    def state_dict(self) -> dict:
        return {"groups": self.groups}

    def load_state_dict(self, state: dict) -> None:
        self.groups = [dict(g) for g in state["groups"]]
