"""The data of the token tasks (sft, pretrain): examples, then packing or multipack.

Examples are padded one per row by default; data.packing packs them end to end into
rows of data.max_length (soup/data/packing.py), data.multipack bins them into
micro-batches of a fixed token budget (soup/data/multipack.py).
"""

from __future__ import annotations

from omegaconf import DictConfig

from soup.data import build_datasets, collate_padded
from soup.data.dataset import DEMO_FILES, resolve_data_path
from soup.data.packing import collate_packed, pack_examples, packing_efficiency
from soup.distributed import current_world
from soup.tasks.base import TaskData


def build_token_data(cfg: DictConfig, tokenizer) -> TaskData:
    splits = build_datasets(cfg.data, tokenizer, cfg.task.name, cfg.seed)
    lines = [splits.report.summary()] + ([splits.val_report.summary()] if splits.val_report is not None else [])

    def collate(examples):
        return collate_padded(examples, tokenizer.pad_token_id)

    train, sampler, eval_collate = splits.train, None, None
    if cfg.data.packing or cfg.data.multipack:
        train, sampler, collate, eval_collate, line = arrange_batches(cfg, splits.train, collate, tokenizer)
        lines.append(line)
    return TaskData(train=train, val=splits.val, collate=collate, eval_collate=eval_collate, sampler=sampler,
                    files=data_files(cfg.data, cfg.task.name), report=splits.report, val_report=splits.val_report,
                    chat_template=splits.chat_template, lines=lines)


def data_files(data_cfg: DictConfig, task_name: str) -> list[str]:
    """The files this run read, for the run record's hashes."""
    train = data_cfg.train_file or DEMO_FILES[task_name]
    files = [resolve_data_path(train, "data.train_file")]
    if data_cfg.val_file:
        files.append(resolve_data_path(data_cfg.val_file, "data.val_file"))
    return [str(f) for f in files]


def arrange_batches(cfg: DictConfig, examples: list, padded_collate, tokenizer):
    """Packing or multipack: (train rows, sampler, train collate, eval collate, log line)."""
    if cfg.data.packing:
        rows = pack_examples(examples, cfg.data.max_length, seed=cfg.seed)
        line = (f"packing: {len(examples)} examples -> {len(rows)} rows of <= {cfg.data.max_length} tokens, "
                f"efficiency {packing_efficiency(rows, cfg.data.max_length):.3f}, cross-document attention "
                f"{'masked' if cfg.data.packing_cross_doc_attn_mask else 'allowed'}")

        def collate(batch_rows):
            return collate_packed(batch_rows, tokenizer.pad_token_id, cfg.data.packing_cross_doc_attn_mask,
                                  cfg.model.attn_implementation)

        # Evaluation stays on padded examples, so its loss means the same with or without packing.
        return rows, None, collate, padded_collate, line
    from soup.data.multipack import MultipackBatchSampler, naive_padding_efficiency

    lengths = [len(e["input_ids"]) for e in examples]
    naive = naive_padding_efficiency(lengths, cfg.train.micro_batch_size, cfg.seed)
    items, collate, eval_collate, what = examples, padded_collate, None, "examples, one per row"
    if cfg.data.multipack_layout == "packed":
        # The bins' items are rows of examples packed end to end (FFD, fixed for the run);
        # the sampler bins those rows micro_batch_size x max_length cells at a time.
        items = pack_examples(examples, cfg.data.max_length, seed=cfg.seed)
        what = f"rows packing {len(examples)} examples, attention inside each example"

        def collate(batch_rows):
            return collate_packed(batch_rows, tokenizer.pad_token_id, True, cfg.model.attn_implementation)

        eval_collate = padded_collate
    world = current_world()
    sampler = MultipackBatchSampler([len(item["input_ids"]) for item in items], cfg.train.micro_batch_size,
                                    cfg.data.max_length, cfg.seed, rank=world.rank, world_size=world.world_size,
                                    max_items_per_bin=cfg.data.multipack_max_items_per_bin,
                                    max_mask_cells=cfg.data.multipack_max_mask_cells)
    line = (f"multipack ({cfg.data.multipack_layout}: {len(items)} {what}): {sampler.batches_per_epoch} bins "
            f"per epoch, efficiency {sampler.efficiency:.3f} of capacity, {sampler.padded_efficiency:.3f} of padded "
            f"cells (random batches of examples: {naive:.3f})")
    return items, sampler, collate, eval_collate, line
