"""The config of `python -m soup.eval` (conf/eval.yaml): its schema and its checks.

Like soup.generate it reuses soup.train's `model` and `quant` groups and adds the fields
below; the suite file (soup/evals/suite.py) says what to evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from soup.config.schema import ModelConfig, QuantConfig, register_configs
from soup.errors import Problems
from soup.generate_config import check_model_flags

PRECISIONS = ("run", "fp32", "bf16", "fp16")


@dataclass
class SuiteConfig:
    """The `suite` group (conf/suite/): `file`, a suite file (soup/evals/suite.py), and `tasks`, fields set
    over its tasks (or new tasks) from the command line: suite.tasks.gsm8k.max_new_tokens=64."""

    name: str = MISSING
    file: Optional[str] = None
    tasks: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """What to evaluate, on which suite, and where the results go.

    The model is `checkpoint`: a run directory (its final/ is evaluated and eval.json lands in
    it), a run's final/, or any save_pretrained model or peft adapter folder (its base found as
    soup.merge finds it); or, with checkpoint=null, the `model` group as soup.train builds it.
    """

    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    suite: SuiteConfig = MISSING
    checkpoint: Optional[str] = None
    # Rows per forward or per generation batch, where a task does not set its own batch_size
    # (a loss task defaults to the run's train.eval_batch_size).
    batch_size: int = 8
    # Autocast of the loss forwards: run (the run's train.precision; fp32 without a run) | fp32 | bf16 | fp16.
    precision: str = "run"
    # Seeds generation (and model=tiny's random weights): the same seed gives the same eval.json.
    seed: int = 42
    # auto | cpu | cuda
    device: str = "auto"
    # Generation prompts: null renders them with the tokenizer's own template (text as written when it
    # has none); a preset (chatml, llama3) or a Jinja string.
    chat_template: Optional[str] = None
    # Where eval.json, eval_samples/ and the tracker's rows go. null: the run directory of a run's
    # checkpoint, else this command's Hydra run directory (outputs/eval/<date>/<time>); in a --multirun,
    # each job's directory.
    output_dir: Optional[str] = None


def register_eval_configs() -> None:
    register_configs()
    store = ConfigStore.instance()
    store.store(name="eval_schema", node=EvalConfig)
    store.store(group="suite", name="suite_schema", node=SuiteConfig)


def validate_eval(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> None:
    named = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    problems = Problems()
    need, one_of = problems.need, problems.one_of
    # conf/suite/file.yaml's `file: ???` composes to the schema's null, so the check is here.
    need(cfg.suite.name != "file" or bool(cfg.suite.file),
         "suite=file needs suite.file.\n    fix: suite.file=path/to/suite.yaml (its layout: soup/evals/suite.py).")
    check_model_flags(cfg, named, problems)
    one_of("precision", cfg.precision, PRECISIONS)
    need(cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: at least 1.")
    problems.raise_any()
