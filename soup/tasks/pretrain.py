"""Continued pretraining: next-token loss on every token of each document.

The data side labels every token (no response mask); the loss is the same
summed next-token cross-entropy as SFT.
"""

from __future__ import annotations

from soup.tasks.sft import SFTTask


class PretrainTask(SFTTask):
    pass
