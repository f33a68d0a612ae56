"""Merge a LoRA-family adapter into its base model and save a plain transformers model.

    python -m soup.merge --adapter outputs/<run>/final --out merged/
    python -m soup.merge --adapter path/to/adapter --base path/to/base --out merged/

The base is --base, else the adapter's own base_model_name_or_path, else (for a
soup run) the model that run built: rebuilt from <run dir>/.hydra/config.yaml, which
is how a model=tiny run's base is found. The merged model's logits equal the adapter
model's (a test checks it); merging happens in float32 whatever the base's dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from soup.errors import SoupError


def load_base(adapter_dir: Path, base: str | None, trust_remote_code: bool = False):
    """The base model to merge into (see the module docstring for the search order).

    A soup run that trained with model.trust_remote_code=true merges with it too."""
    from omegaconf import OmegaConf

    from soup.models.load import head_spec

    # The adapter's own record of the head it trained (a reward model's score, ...), sized as saved:
    # a classifier's head has one row per class.
    task_type = json.loads((adapter_dir / "adapter_config.json").read_text()).get("task_type")
    head = {"SEQ_CLS": "sequence_score", "TOKEN_CLS": "token_classes",
            "FEATURE_EXTRACTION": "encoder"}.get(task_type, "causal_lm")
    if head == "sequence_score" and (adapter_dir / "head_config.json").exists():  # a soup classifier's classes
        head = ("sequence_score", json.loads((adapter_dir / "head_config.json").read_text()))
    elif head == "sequence_score" and saved_head_rows(adapter_dir) not in (None, 1):
        head = ("sequence_score", {"num_labels": saved_head_rows(adapter_dir)})
    head_class, head_config = head_spec(head)
    run_config = adapter_dir.parent / ".hydra" / "config.yaml"
    run_cfg = OmegaConf.load(run_config) if run_config.exists() else None
    trust_remote_code = trust_remote_code or bool(run_cfg is not None and run_cfg.model.get("trust_remote_code"))
    origin = "--base"
    if base is None:
        origin = f"base_model_name_or_path in {adapter_dir / 'adapter_config.json'}"
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if (adapter_dir / "base_model").is_dir():  # LoftQ saves its modified base beside the adapter
            base, origin = str(adapter_dir / "base_model"), f"the adapter's own {adapter_dir / 'base_model'}"
    if base:
        source = _checked_base(base, origin)
        try:
            return head_class.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                              **head_config)
        except OSError as exc:  # a hub id that is neither cached nor reachable
            raise SoupError(f"the base model {base} (from {origin}) could not be loaded: {exc}\n"
                            "  fix: pass --base <the base model's folder>.") from exc
    if run_cfg is None:
        raise SoupError(f"{adapter_dir}: the adapter names no base model and is not inside a soup run directory.\n"
                        "  fix: pass --base <base model directory>.")
    from soup.models.load import build_model, build_tokenizer

    return build_model(run_cfg.model, build_tokenizer(run_cfg.model), run_cfg.seed, head)


def saved_head_rows(adapter_dir: Path) -> int | None:
    """Rows of the score head an adapter directory saved beside its adapters (None: none saved)."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.exists():
        return None
    with safe_open(str(weights), framework="pt") as saved:
        for key in saved.keys():
            if key.endswith("score.weight"):
                return saved.get_slice(key).get_shape()[0]
    return None


def _checked_base(base: str, origin: str) -> str:
    """The base as from_pretrained should get it; a SoupError naming where it came from when it is unusable."""
    from soup.errors import ConfigError
    from soup.models.files import model_source

    try:
        flag = "--base" if origin == "--base" else "base_model_name_or_path"
        return model_source(base, flag, needs_tokenizer=False)
    except ConfigError as exc:
        if origin == "--base":
            raise
        problem = str(exc).split("\n")[0]
        raise SoupError(f"{problem}\n  (the base was read from {origin}: the run trained on it there)\n"
                        "  fix: pass --base <the base model's folder>.") from exc


def merge(adapter_dir: Path, out_dir: Path, base: str | None = None, trust_remote_code: bool = False) -> Path:
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise SoupError(f"--adapter {adapter_dir}: no adapter_config.json there.\n"
                        "  fix: point --adapter at a run's final/ directory (trained with a peft option).")
    model = PeftModel.from_pretrained(load_base(adapter_dir, base, trust_remote_code), adapter_dir).merge_and_unload()
    model.save_pretrained(out_dir)
    if (adapter_dir / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(out_dir)
    _add_sentence_transformers_files(adapter_dir, model, Path(out_dir))
    from soup.model_card import write_card_if_from_run

    write_card_if_from_run(adapter_dir, Path(out_dir))  # a model card, when the adapter is a soup run's final/
    return Path(out_dir)


def _add_sentence_transformers_files(adapter_dir: Path, model, out_dir: Path) -> None:
    """A soup task=embedding run's merged model is a sentence-transformers directory, as its final/
    would be without adapters (its pooling read from the run's config)."""
    from omegaconf import OmegaConf

    run_config = adapter_dir.parent / ".hydra" / "config.yaml"
    if not run_config.exists():
        return
    run_cfg = OmegaConf.load(run_config)
    if run_cfg.task.name != "embedding":
        return
    from soup.tasks.embedding import resolve_pooling, write_sentence_transformers_files

    pooling = resolve_pooling(run_cfg.task.pooling, model.config.model_type)
    write_sentence_transformers_files(out_dir, pooling, model.config.hidden_size, run_cfg.data.max_length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soup.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, type=Path, help="adapter directory (a run's final/)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the merged model")
    parser.add_argument("--base", default=None, help="base model directory or hub id (default: see above)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the base model's own modelling code (as model.trust_remote_code)")
    args = parser.parse_args(argv)
    try:
        out = merge(args.adapter, args.out, args.base, args.trust_remote_code)
    except SoupError as exc:
        print(f"[soup] error: {exc}", file=sys.stderr)
        return 2
    print(f"[soup] merged {args.adapter} into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
