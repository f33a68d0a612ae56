"""Apply the memory and speed features a config asks for to a built model.

Order matters: low-precision layers replace nn.Linear modules first, checkpointing
wraps decoder blocks, offloading wraps the model's forward, and kernels (which may
compile the whole model) come last. Each step returns a line for the run log, so
every flag is observable.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig


class MemoryFeatures:
    """What was applied to the model, and what must be undone when the run ends."""

    def __init__(self):
        self.lines: list[str] = []
        self._closers: list = []
        self._summaries: list = []

    def summaries(self) -> list[str]:
        """End-of-run lines (e.g. how many activations went to disk)."""
        return [summary() for summary in self._summaries]

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()


def apply_memory_features(model: torch.nn.Module, cfg: DictConfig, run_dir: Path,
                          device: torch.device, sample_batch: dict | None = None):
    """Returns (model, MemoryFeatures). The model may be a new object (kernels=compile)."""
    features = MemoryFeatures()
    if cfg.quant.name == "fp8":
        from soup.memory.fp8 import apply_fp8

        features.lines.append(apply_fp8(model, cfg.quant.fp8_recipe, device))
    elif cfg.quant.name == "int8_qat":
        from soup.memory.fp8 import apply_int8_qat

        features.lines.append(apply_int8_qat(model, cfg.quant.qat_group_size, cfg.quant.qat_weight_bits))

    if cfg.checkpointing.name != "none":
        from soup.memory.checkpointing import apply_checkpointing

        half = cfg.train.precision in ("bf16", "fp16")
        features.lines.append(apply_checkpointing(
            model, cfg.checkpointing.name, device,
            tokens_per_micro_batch=cfg.train.micro_batch_size * cfg.data.max_length,
            bytes_per_activation=2 if half else 4))

    if cfg.offload.name != "none":
        from soup.memory.offload import ActivationOffload, wrap_model_forward

        offload = ActivationOffload(cfg.offload.name, scratch_dir=Path(cfg.offload.scratch_dir), run_dir=run_dir,
                                    min_bytes=cfg.offload.min_bytes)
        handle = wrap_model_forward(model, offload)
        features._closers.append(offload.close)
        features._closers.append(handle.remove)
        features._summaries.append(offload.summary)
        target = offload.scratch_dir if cfg.offload.name == "disk" else "pinned host memory"
        features.lines.append(f"offload: {cfg.offload.name} -> {target} (tensors >= {cfg.offload.min_bytes} bytes)")

    if cfg.kernels.name != "none":
        from soup.memory.kernels import apply_kernels

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        model, line = apply_kernels(model, cfg.kernels.name, device, sample_batch, autocast_dtype=dtype)
        features.lines.append(line)
    if cfg.kernels.cut_ce != "off":
        features.lines.append(f"loss: LM head + cross-entropy via {cfg.kernels.cut_ce} "
                              f"(chunk {cfg.kernels.ce_chunk_size} rows)")
    return model, features
