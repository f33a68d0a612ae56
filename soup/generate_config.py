"""The config of `python -m soup.generate` (conf/generate.yaml): its schema and its checks.

It reuses two of soup.train's groups as they are (`model`: tiny | hf, `quant`: none |
4bit | 8bit) and adds the fields below. Like soup/config/schema.py, the schema is a
dataclass in Hydra's ConfigStore, so a typo or a wrong type fails at compose time;
the rules Hydra cannot state (ranges, which mode reads which flag) are
`validate_generate`, each message naming the flag and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from soup.config.schema import ModelConfig, QuantConfig, register_configs
from soup.errors import Problems

MODES = ("batch", "chat")
# fp8 and int8_qat are ways of training; a model trained with int8_qat saved its converted weights in final/.
QUANTS = ("none", "4bit", "8bit")
MODELS = ("tiny", "hf")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("auto", "cpu", "cuda")
# Read by mode=batch only: naming one with mode=chat is an error, not a silent no-op.
BATCH_ONLY = ("prompts_file", "max_rows", "output_file", "batch_size")


@dataclass
class GenerateConfig:
    """What to sample from, from which prompts, and how.

    The model is `checkpoint` (a soup run's final/: a full model, or an adapter whose base is
    found as `python -m soup.merge` finds it: `model=hf model.path=<base>` if given, else the
    adapter's base_model_name_or_path, else the model its run built from <run dir>/.hydra/),
    or, with checkpoint=null, the `model` group as soup.train would build it (model=tiny: random
    weights from `seed`). `quant=4bit|8bit` loads the weights through bitsandbytes.
    """

    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    # A run's final/ directory (or any save_pretrained / peft adapter directory); null: the model group.
    checkpoint: Optional[str] = None
    # batch: each row of prompts_file -> one row of output_file. chat: a conversation on stdin/stdout.
    mode: str = "batch"
    # .jsonl rows with `prompt` (text or a list of chat messages) or `messages` (a conversation;
    # a final assistant turn is generated anew). Relative paths resolve against the launch directory.
    prompts_file: Optional[str] = None
    # Only the first N rows of prompts_file (null: all).
    max_rows: Optional[int] = None
    # null: <run dir>/generations.jsonl. Rows {prompt, completion, finish_reason, tokens}, in input order.
    output_file: Optional[str] = None
    # Prompts per batch of the rollout engine (batch mode).
    batch_size: int = 8
    # Sampling (soup/rollout/engine.py): temperature 0 is greedy; top_k 0, top_p 1.0, min_p 0.0 and
    # repetition_penalty 1.0 turn those processors off.
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # Seeds the one torch.Generator every draw comes from (and model=tiny's random weights):
    # the same seed, prompts and batch_size give the same output file.
    seed: int = 42
    # The first message of every conversation, unless a prompts row brings its own system message.
    system_prompt: Optional[str] = None
    # null: the tokenizer's own template (none: text prompts are used as written); a preset
    # (chatml, llama3, as data.chat_template names them) or a Jinja string.
    chat_template: Optional[str] = None
    # auto | cpu | cuda
    device: str = "auto"


def register_generate_configs() -> None:
    """Put the schema in Hydra's ConfigStore beside soup.train's group schemas (idempotent)."""
    register_configs()  # model_schema and quant_schema, which conf/model/*.yaml and conf/quant/*.yaml name
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def validate_generate(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Raise ConfigError listing every problem in `cfg`, or return None.

    `overrides`: the command-line overrides; a flag they name that this mode does not read is an error."""
    named = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    problems = Problems()
    need, one_of = problems.need, problems.one_of

    one_of("mode", cfg.mode, MODES)
    check_model_flags(cfg, named, problems)
    if cfg.mode == "batch":
        need(bool(cfg.prompts_file), "mode=batch needs prompts_file.\n    fix: prompts_file=prompts.jsonl (rows with "
                                     "`prompt` or `messages`), or mode=chat for a conversation on the terminal.")
    for flag in BATCH_ONLY:
        need(cfg.mode == "batch" or flag not in named,
             f"{flag} is read in mode=batch only, and this is mode={cfg.mode}.\n"
             f"    fix: drop {flag}, or set mode=batch.")
    need(cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: at least 1.")
    need(cfg.max_rows is None or cfg.max_rows >= 1, f"max_rows={cfg.max_rows}: at least 1, or null for every row.")
    need(cfg.max_new_tokens >= 1, f"max_new_tokens={cfg.max_new_tokens}: at least 1.")
    need(cfg.temperature >= 0, f"temperature={cfg.temperature}: 0 (greedy) or more.")
    need(0 < cfg.top_p <= 1, f"top_p={cfg.top_p}: in (0, 1]; 1.0 turns it off.")
    need(cfg.top_k >= 0, f"top_k={cfg.top_k}: 0 (off) or more.")
    need(0 <= cfg.min_p < 1, f"min_p={cfg.min_p}: in [0, 1); 0 turns it off.")
    need(cfg.repetition_penalty > 0, f"repetition_penalty={cfg.repetition_penalty}: above 0; 1.0 turns it off.")
    problems.raise_any()


def check_model_flags(cfg: DictConfig, named: set[str], problems: Problems) -> None:
    """The model, quant, checkpoint and device flags soup.generate and soup.eval share."""
    need, one_of = problems.need, problems.one_of
    one_of("model", cfg.model.name, MODELS)
    one_of("model.dtype", cfg.model.dtype, DTYPES)
    one_of("model.attn_implementation", cfg.model.attn_implementation, ATTENTION)
    one_of("device", cfg.device, DEVICES)
    need(cfg.quant.name in QUANTS, f"quant={cfg.quant.name} is a way of training; a sampled or evaluated model is "
                                   f"loaded as it is or through bitsandbytes.\n    fix: quant={' | quant='.join(QUANTS)}.")
    if cfg.checkpoint is None:
        need(cfg.model.name != "hf" or bool(cfg.model.path),
             "model=hf needs model.path (a local directory or a hub id), or give checkpoint=<a run's final/>.")
    else:
        shaped = sorted(flag for flag in named if flag.startswith("model.tiny."))
        need(not shaped, f"{', '.join(shaped)} shape a model built from scratch; with checkpoint= the weights and "
                         "their shape come from the checkpoint.\n    fix: drop them.")
    need(cfg.device != "cuda" or torch.cuda.is_available(), "device=cuda, and torch sees no CUDA device.\n"
                                                            "    fix: device=auto or device=cpu.")
