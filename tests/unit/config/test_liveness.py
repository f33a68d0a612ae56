"""Every config field is live or rejected: the enumerated liveness test.

The fields are walked from the schema dataclasses (soup/config/schema.py), so a new
field is covered the moment it exists. Each field must be in exactly one of:

- LIVE: in a setting where the field applies, changing it changes what a real run
  (in process, a tiny model, two steps) observably does: its metrics, the bytes of
  its saved files, its parameter counts, its run log, or the error it stops with.
  If the field is conditional (soup/config/scope.py), setting it in a run where it
  does not apply -- on the command line, at its default value -- is rejected at
  config load with a message that names it.
- EXEMPT: with the reason, and the test that covers it instead.

A field that is neither fails test_every_field_is_live_or_exempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from soup.config import register_configs, validate
from soup.config.schema import (GROUP_SCHEMAS, ClassifierTaskConfig, DistillTaskConfig, EmbeddingTaskConfig, GRPOTaskConfig, PPOTaskConfig, PreferenceTaskConfig,
                                PRMTaskConfig,
                                RewardModelTaskConfig, SoupConfig, TrainConfig)
from soup.config.scope import ROOT_VALUES, field_scopes, leaf_fields
from soup.errors import ConfigError, SoupError

pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parents[3] / "conf"
register_configs()

# A run of seconds: the debug model, a few rows, two optimizer steps, a final eval.
BASE = ["debug=tiny", "train.max_steps=2", "data.max_rows=24", "data.overlong=truncate_or_drop", "train.save_every_steps=0"]
WIDE = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128"]  # bitsandbytes CPU 4-bit blocks
LORA = ["peft=lora"]
HF, HF_OTHER, REMOTE, TOKENIZER = "{hf}", "{hf_other}", "{remote}", "{tokenizer}"
SFT_FILE, TEXT_FILE, DUAL_FILE = "{sft_file}", "{text_file}", "{dual_file}"
# Online RL on the debug model: a reward that varies with what it writes (its length), so
# advantages are not all zero and each setting shows in the metrics.
GRPO = ["task=grpo", "task.reward=[{len_reward}]", "task.num_generations=2", "task.max_completion_length=8",
        "train.micro_batch_size=2"]
GRPO_MU2 = [*GRPO, "task.num_iterations=2", "optim.lr=1e-2"]  # the second pass sees a ratio away from 1
# PPO with one step per rollout batch: the second rollout comes from a policy that moved from the reference.
PPO = ["task=ppo", "task.reward=[{len_reward}]", "task.max_completion_length=8", "train.micro_batch_size=2",
       "task.ppo_epochs=1"]
PPO_TWICE = [*PPO, "task.ppo_epochs=2", "optim.lr=1e-2"]  # the second step sees models that moved: clips act
DISTILL = ["task=distill", f"task.teacher.path={HF}"]  # the {hf} model shares model=tiny's byte tokenizer
CLASSIFIER = ["task=classifier", "data=file", "data.train_file={cls_file}"]
EMBEDDING = ["task=embedding", "data=file", "data.train_file={emb_file}"]
EMBEDDING_SCORED = ["task=embedding", "task.loss=cosent", "data=file", "data.train_file={emb_scored_file}"]
# The eval gate on a four-row multiple-choice suite, each step; GATE_STRICT against a baseline no
# tiny model reaches (every accuracy 1.0), so it regresses at once.
GATE = ["train.eval_gate={gate_suite}", "train.eval_gate_every_steps=1"]
GATE_STRICT = [*GATE, "train.eval_gate_baseline={gate_baseline}", "train.eval_gate_metrics=[capitals/acc]"]

# field: (setting where it applies, the change). A setting or change is a list of overrides.
LIVE: dict[str, tuple[list[str], list[str]]] = {
    # task
    "task.name": ([], ["task=pretrain"]),
    "task.preference_loss": (["task=preference", "task.preference_loss=sigmoid"], ["task.preference_loss=hinge"]),
    "task.loss_type": (["task=dpo"], ["task.loss_type=hinge"]),
    "task.preference_loss_weights": (["task=preference", "task.preference_loss=sigmoid"],
                                     ["task.preference_loss=null", "task.preference_loss_weights={sigmoid:0.5,hinge:0.5}"]),
    "task.beta": (["task=dpo"], ["task.beta=0.5"]),
    "task.kl_in_reward": ([*GRPO, "task=rloo", "task.beta=0.5"], ["task.kl_in_reward=false"]),
    "task.center_rewards_coefficient": (["task=reward_model"], ["task.center_rewards_coefficient=0.5"]),
    "task.value_init": ([*PPO, "task.reward=[{rm}]"], ["task.value_init=policy"]),
    "task.text_column": (CLASSIFIER, ["task.text_column=other"]),
    "task.pair_column": (CLASSIFIER, ["task.pair_column=other"]),
    "task.label_column": (CLASSIFIER, ["task.label_column=topic"]),
    "task.num_labels": ([*CLASSIFIER, "task.label_column=index"], ["task.num_labels=4"]),
    "task.class_weights": (CLASSIFIER, ["task.class_weights=[1.0,3.0]"]),
    "train.spike_factor": (["train.save_every_steps=1"], ["train.spike_factor=3.0"]),
    "train.spike_window": (["train.save_every_steps=1", "train.spike_factor=3.0"], ["train.spike_window=5"]),
    "train.spike_max_recoveries": (["train.save_every_steps=1", "train.spike_factor=3.0"],
                                   ["train.spike_max_recoveries=1"]),
    "train.spike_lr_factor": (["train.save_every_steps=1", "train.spike_factor=3.0"], ["train.spike_lr_factor=0.5"]),
    "train.lr_finder": ([], ["train.lr_finder=true", "train.lr_finder_steps=5"]),
    "train.lr_finder_min_lr": (["train.lr_finder=true", "train.lr_finder_steps=5"], ["train.lr_finder_min_lr=1e-4"]),
    "train.lr_finder_max_lr": (["train.lr_finder=true", "train.lr_finder_steps=5"], ["train.lr_finder_max_lr=0.01"]),
    "train.lr_finder_steps": (["train.lr_finder=true", "train.lr_finder_steps=5"], ["train.lr_finder_steps=4"]),
    "train.eval_gate": ([], ["train.eval_gate={gate_suite}", "train.eval_gate_every_steps=1"]),
    "train.eval_gate_every_steps": (GATE, ["train.eval_gate_every_steps=2"]),
    "train.eval_gate_every_epochs": (["train.eval_gate={gate_suite}", "train.eval_gate_every_epochs=1"],
                                     ["train.eval_gate_every_epochs=2"]),
    "train.eval_gate_metrics": (GATE_STRICT, ["train.eval_gate_metrics=[capitals/acc_norm]"]),
    "train.eval_gate_threshold": (GATE_STRICT, ["train.eval_gate_threshold=1.0"]),
    "train.eval_gate_action": (GATE_STRICT, ["train.eval_gate_action=warn"]),
    "train.eval_gate_baseline": (GATE, ["train.eval_gate_baseline={gate_baseline}"]),
    "task.loss": (EMBEDDING_SCORED, ["task.loss=cosine"]),
    "task.scale": (EMBEDDING, ["task.scale=5.0"]),
    "task.symmetric": (EMBEDDING, ["task.symmetric=true"]),
    "task.pooling": (EMBEDDING, ["task.pooling=mean"]),
    "task.matryoshka_dims": (EMBEDDING, ["task.matryoshka_dims=[16]"]),
    "task.matryoshka_weights": ([*EMBEDDING, "task.matryoshka_dims=[32,16]"], ["task.matryoshka_weights=[1.0,0.25]"]),
    "task.text_columns": (EMBEDDING, ["task.text_columns=[query,passage]"]),
    "task.score_column": (EMBEDDING_SCORED, ["task.score_column=rating"]),
    "task.negative_columns": (EMBEDDING, ["task.negative_columns=[]"]),
    "task.score_scale": ([*EMBEDDING_SCORED, "task.loss=cosine"], ["task.score_scale=2.0"]),
    "task.teacher.path": (DISTILL, [f"task.teacher.path={HF_OTHER}"]),
    "task.teacher.quant": (DISTILL, ["task.teacher.quant=8bit"]),
    "task.lmbda": (DISTILL, ["task.lmbda=1.0", "task.max_new_tokens=8"]),
    "task.max_new_tokens": ([*DISTILL, "task.lmbda=1.0", "task.max_new_tokens=8"], ["task.max_new_tokens=3"]),
    "task.teacher.top_k": (DISTILL, ["task.teacher.top_k=8", "task.teacher.cache_dir={tmp}/topk"]),
    "task.teacher.cache_dir": ([*DISTILL, "task.teacher.top_k=8", "task.teacher.cache_dir={tmp}/topk_a"],
                               ["task.teacher.cache_dir={tmp}/topk_b"]),
    "task.divergence": (DISTILL, ["task.divergence=reverse_kl"]),
    "task.jsd_beta": ([*DISTILL, "task.divergence=generalized_jsd"], ["task.jsd_beta=0.1"]),
    "task.alpha": (DISTILL, ["task.alpha=0.9"]),
    "task.kl_coef": (PPO, ["task.kl_coef=0.5"]),
    "task.kl_estimator": (PPO, ["task.kl_estimator=k3"]),
    "task.target_kl": (PPO, ["task.target_kl=0.01"]),
    "task.kl_horizon": ([*PPO, "task.target_kl=0.01"], ["task.kl_horizon=10"]),
    "task.missing_eos_penalty": (PPO, ["task.missing_eos_penalty=1.0"]),
    "task.whiten_rewards": (PPO, ["task.whiten_rewards=true"]),
    "task.gamma": (PPO, ["task.gamma=0.5"]),
    "task.lam": (PPO, ["task.lam=0.5"]),
    "task.cliprange": (PPO_TWICE, ["task.cliprange=0.01"]),
    "task.cliprange_value": (PPO_TWICE, ["task.cliprange_value=0.001"]),
    "task.vf_coef": (PPO, ["task.vf_coef=1.0"]),
    "task.ppo_epochs": (PPO, ["task.ppo_epochs=2"]),
    "task.num_mini_batches": ([*PPO, "train.grad_accum_steps=2"], ["task.num_mini_batches=2"]),
    "task.step_separator": (["task=prm"], ["task.step_separator=' ;'"]),
    "task.train_on_last_step_only": (["task=prm"], ["task.train_on_last_step_only=true"]),
    "task.beta_schedule": (["task=dpo"], ["task.beta_schedule=linear", "task.beta_end=2.0"]),
    "task.beta_end": (["task=dpo", "task.beta_schedule=linear", "task.beta_end=2.0"], ["task.beta_end=0.01"]),
    "task.label_smoothing": (["task=dpo"], ["task.label_smoothing=0.3"]),
    "task.rpo_alpha": (["task=dpo"], ["task.rpo_alpha=1.0"]),
    "task.reference": (["task=dpo"], ["task.reference=precomputed", "task.ref_cache_dir={tmp}/ref"]),
    "task.precompute_with": (["task=dpo", *LORA, "task.reference=precomputed", "task.ref_cache_dir={tmp}/ref"],
                             ["task.precompute_with=copy"]),
    "task.ref_cache_dir": (["task=dpo", "task.reference=precomputed", "task.ref_cache_dir={tmp}/ref_a"],
                           ["task.ref_cache_dir={tmp}/ref_b"]),
    "task.ref_refresh_epochs": (["task=dpo", "data.max_rows=10", "train.max_steps=4"], ["task.ref_refresh_epochs=1"]),
    "task.simpo_gamma": (["task=simpo"], ["task.simpo_gamma=2.0"]),
    "task.cpo_alpha": (["task=cpo"], ["task.cpo_alpha=0.3"]),
    "task.orpo_lambda": (["task=orpo"], ["task.orpo_lambda=0.7"]),
    "task.discopop_tau": (["task=dpo", "task.loss_type=discopop"], ["task.discopop_tau=0.5"]),
    "task.desirable_weight": (["task=kto"], ["task.desirable_weight=2.0"]),
    "task.undesirable_weight": (["task=kto"], ["task.undesirable_weight=2.0"]),
    "task.sequence_layout": (["task=dpo"], ["task.sequence_layout=stacked"]),
    "task.reward": (GRPO, ["task.reward=[{len_reward},format]"]),
    "task.reward_weights": (GRPO, ["task.reward_weights=[3.0]"]),
    "task.num_generations": (GRPO, ["task.num_generations=3"]),
    "task.max_completion_length": (GRPO, ["task.max_completion_length=5"]),
    "task.temperature": (GRPO, ["task.temperature=0.5"]),
    "task.top_p": (GRPO, ["task.top_p=0.3"]),
    "task.top_k": (GRPO, ["task.top_k=3"]),
    "task.min_p": (GRPO, ["task.min_p=0.5"]),
    # At temperature 1 the random debug model's near-uniform logits hide the penalty: sharpen them.
    "task.repetition_penalty": ([*GRPO, "task.temperature=0.01"], ["task.repetition_penalty=3.0"]),
    "task.scale_rewards": (GRPO, ["task.scale_rewards=none"]),
    "task.format_pattern": ([*GRPO, "task.reward=[{len_reward},format]"], ["task.format_pattern=.*"]),
    "task.stop": (GRPO, ["task.stop=[a,e,i,o,u]"]),
    "task.prompt_template": ([*GRPO, "data=file", "data.train_file={questions_file}", "data.max_length=512"],
                             ["task.prompt_template=r1_zero"]),
    "task.num_iterations": (GRPO, ["task.num_iterations=2"]),
    "task.epsilon": (GRPO_MU2, ["task.epsilon=0.01"]),
    "task.epsilon_high": (GRPO_MU2, ["task.epsilon_high=0.01"]),
    "task.delta": (GRPO_MU2, ["task.delta=1.001"]),
    "task.importance_sampling_level": (GRPO_MU2, ["task.importance_sampling_level=sequence"]),
    "task.tis_threshold": (GRPO, ["task.tis_threshold=0.5"]),
    "task.mask_truncated_completions": (GRPO, ["task.mask_truncated_completions=true"]),
    "task.skip_zero_advantage": (GRPO, ["task.skip_zero_advantage=true"]),
    "task.off_policy_mask_threshold": ([*GRPO, "task.top_k=3"], ["task.off_policy_mask_threshold=0.0"]),
    "task.replay_buffer_size": (GRPO, ["task.replay_buffer_size=4"]),
    "task.ref_sync_steps": ([*GRPO, "task.beta=0.5"], ["task.ref_sync_steps=1"]),
    "task.ref_model_ema_alpha": ([*GRPO, "task.beta=0.5", "task.ref_sync_steps=1"], ["task.ref_model_ema_alpha=0.5"]),
    # model
    "model.name": ([], ["model=hf", f"model.path={HF}"]),
    "model.path": (["model=hf", f"model.path={HF}"], [f"model.path={HF_OTHER}"]),
    "model.tokenizer_path": ([], [f"model.tokenizer_path={TOKENIZER}"]),
    "model.dtype": (LORA, ["model.dtype=bfloat16"]),
    "model.attn_implementation": ([], ["model.attn_implementation=eager"]),
    "model.trust_remote_code": (["model=hf", f"model.path={REMOTE}"], ["model.trust_remote_code=true"]),
    "model.tiny.hidden_size": ([], ["model.tiny.hidden_size=64"]),
    "model.tiny.intermediate_size": ([], ["model.tiny.intermediate_size=96"]),
    "model.tiny.num_hidden_layers": ([], ["model.tiny.num_hidden_layers=3"]),
    "model.tiny.num_attention_heads": ([], ["model.tiny.num_attention_heads=4"]),
    "model.tiny.num_key_value_heads": ([], ["model.tiny.num_key_value_heads=2"]),
    "model.tiny.max_position_embeddings": ([], ["model.tiny.max_position_embeddings=128"]),
    "model.tiny.rope_theta": ([], ["model.tiny.rope_theta=100.0"]),
    "model.tiny.tie_word_embeddings": ([], ["model.tiny.tie_word_embeddings=false"]),
    # data
    "data.name": ([], ["data=file", f"data.train_file={SFT_FILE}"]),
    "data.train_file": (["data=file", "data.train_file=pkg://demo/sft.jsonl"], [f"data.train_file={SFT_FILE}"]),
    "data.val_file": (["data.val_split=0"], ["data.val_file=pkg://demo/sft.jsonl"]),
    "data.format": (["data=file", f"data.train_file={DUAL_FILE}"], ["data.format=alpaca"]),
    "data.chat_template": ([], ["data.chat_template=llama3"]),
    "data.max_length": ([], ["data.max_length=90"]),
    "data.overlong": (["data.max_length=90"], ["data.overlong=drop"]),
    "data.val_split": ([], ["data.val_split=0.3"]),
    "data.train_on_responses_only": ([], ["data.train_on_responses_only=false"]),
    "data.max_rows": ([], ["data.max_rows=16"]),
    "data.text_field": (["task=pretrain", "data=file", f"data.train_file={TEXT_FILE}"], ["data.text_field=body"]),
    "data.packing": ([], ["data.packing=true"]),
    "data.packing_cross_doc_attn_mask": (["data.packing=true"], ["data.packing_cross_doc_attn_mask=true"]),
    "data.multipack": ([], ["data.multipack=true"]),
    "data.multipack_layout": (["data.multipack=true"], ["data.multipack_layout=padded"]),
    "data.multipack_max_items_per_bin": (["data.multipack=true", "data.multipack_layout=padded"],
                                         ["data.multipack_max_items_per_bin=2"]),
    "data.multipack_max_mask_cells": (["data.multipack=true"], ["data.multipack_max_mask_cells=16384"]),
    "data.max_prompt_length": (["task=dpo"], ["data.max_prompt_length=8"]),
    "data.max_completion_length": (["task=dpo"], ["data.max_completion_length=4"]),
    # quant
    "quant.name": ([*WIDE, *LORA], ["quant=8bit"]),
    "quant.fp8_recipe": (["quant=fp8"], ["quant.fp8_recipe=rowwise"]),
    "quant.qat_group_size": (["quant=int8_qat"], ["quant.qat_group_size=16"]),
    "quant.qat_weight_bits": (["quant=int8_qat"], ["quant.qat_weight_bits=4"]),
    "quant.quant_type": ([*WIDE, *LORA, "quant=4bit"], ["quant.quant_type=fp4"]),
    "quant.double_quant": ([*WIDE, *LORA, "quant=4bit"], ["quant.double_quant=false"]),
    "quant.compute_dtype": ([*WIDE, *LORA, "quant=4bit"], ["quant.compute_dtype=bfloat16"]),
    "quant.quant_storage": ([*WIDE, *LORA, "quant=4bit"], ["quant.quant_storage=float32"]),
    # kernels, checkpointing, offload
    "kernels.name": ([], ["kernels=compile"]),
    "kernels.cut_ce": ([], ["kernels.cut_ce=chunked"]),
    "kernels.ce_chunk_size": (["kernels.cut_ce=chunked"], ["kernels.ce_chunk_size=16"]),
    "checkpointing.name": ([], ["checkpointing=full"]),
    "offload.name": ([], ["offload=disk"]),
    "offload.scratch_dir": (["offload=disk"], ["offload.scratch_dir=elsewhere"]),
    "offload.min_bytes": (["offload=disk"], ["offload.min_bytes=1024"]),
    # peft
    "peft.name": ([], LORA),
    "peft.r": (LORA, ["peft.r=4"]),
    "peft.alpha": (LORA, ["peft.alpha=64"]),
    "peft.dropout": (LORA, ["peft.dropout=0.5"]),
    "peft.target_modules": (LORA, ["peft.target_modules=[q_proj,v_proj]"]),
    "peft.rank_pattern": (LORA, ["peft.rank_pattern={q_proj:4}"]),
    "peft.alpha_pattern": (LORA, ["peft.alpha_pattern={q_proj:64}"]),
    "peft.init": (LORA, ["peft.init=gaussian"]),
    "peft.vera_d_initial": (["peft=vera"], ["peft.vera_d_initial=0.5"]),
    "peft.freeze_layers": ([], ["peft.freeze_layers=1"]),
    "peft.freeze_ratio": ([], ["peft.freeze_ratio=0.5"]),
    "peft.loraplus_lr_ratio": (LORA, ["peft.loraplus_lr_ratio=16"]),
    # optim, sched
    "optim.name": ([], ["optim=sgd"]),
    "optim.lr": ([], ["optim.lr=1e-2"]),
    "optim.weight_decay": ([], ["optim.weight_decay=0.5"]),
    "optim.betas": ([], ["optim.betas=[0.5,0.9]"]),
    "optim.eps": ([], ["optim.eps=0.1"]),
    "optim.momentum": (["optim=sgd"], ["optim.momentum=0.5"]),
    "optim.nesterov": (["optim=sgd"], ["optim.nesterov=true"]),
    "optim.implementation": ([], ["optim.implementation=for_loop"]),
    "optim.galore_rank": (["optim=galore"], ["optim.galore_rank=4"]),
    "optim.galore_update_proj_gap": (["optim=galore"], ["optim.galore_update_proj_gap=1"]),
    "optim.galore_scale": (["optim=galore"], ["optim.galore_scale=1.0"]),
    "optim.galore_proj_type": (["optim=galore"], ["optim.galore_proj_type=left"]),
    "optim.lr_groups": ([], ["optim.lr_groups=[{pattern:'layers\\.0\\.',lr:1e-5}]"]),
    "sched.name": ([], ["sched=linear"]),
    "sched.warmup_steps": ([], ["sched.warmup_steps=1"]),
    "sched.warmup_ratio": ([], ["sched.warmup_ratio=0.5"]),
    "sched.min_lr_ratio": ([], ["sched.min_lr_ratio=0.5"]),
    # tracker
    "tracker.name": ([], ["tracker=tensorboard"]),
    "tracker.project": (["tracker=wandb"], ["tracker.project=another"]),
    "tracker.mode": (["tracker=wandb"], ["tracker.mode=disabled"]),
    # train
    "train.micro_batch_size": ([], ["train.micro_batch_size=2"]),
    "train.grad_accum_steps": ([], ["train.grad_accum_steps=2"]),
    "train.max_steps": ([], ["train.max_steps=1"]),
    "train.epochs": (["train.max_steps=null", "data.max_rows=10"], ["train.epochs=2"]),
    "train.precision": ([], ["train.precision=bf16"]),
    "train.max_grad_norm": ([], ["train.max_grad_norm=0.01"]),
    "train.eval_every_steps": ([], ["train.eval_every_steps=1"]),
    "train.eval_at_start": ([], ["train.eval_at_start=true"]),
    "train.save_every_steps": ([], ["train.save_every_steps=1"]),
    "train.keep_last_checkpoints": (["train.save_every_steps=1"], ["train.keep_last_checkpoints=1"]),
    "train.log_every_steps": ([], ["train.log_every_steps=2"]),
    "train.neftune_alpha": ([], ["train.neftune_alpha=5.0"]),
    "seed": ([], ["seed=7"]),
}

# A LIVE entry whose base run (setting without the change) stops with this error, by design.
BASE_ERRORS = {"model.trust_remote_code": "trust_remote_code"}

EXEMPT = {
    "train.auto_micro_batch_size": "CUDA only (refused on CPU at config load); tests/unit/test_stability.py "
                                   "drives its search with a simulated out-of-memory error and pins the refusal",
    "backend.name": "one option (transformers): the group exists so that a second modelling library is an "
                    "option, not a refactor; conf/backend/transformers.yaml and the README say so",
    "parallelism.name": "ddp needs torchrun's processes, which an in-process run cannot start; "
                        "tests/integration/test_distributed.py runs it under torchrun and pins that it matches "
                        "one process with the global batch, and that parallelism=ddp without torchrun is refused",
    "parallelism.reshard_after_forward": "fsdp2 needs torchrun's processes; tests/integration/test_distributed.py "
                                         "trains with it off and on, and the rejection half runs here",
    "parallelism.offload_optimizer": "CUDA only (rejected on CPU at config load, tests/unit/config/"
                                     "test_parallelism.py); tests/gpu covers it where a GPU is lent",
    "parallelism.offload_param": "CUDA only (rejected on CPU at config load, tests/unit/config/test_parallelism.py); "
                                 "tests/gpu covers it where a GPU is lent",
    "parallelism.cpu_offload": "CUDA only (rejected on CPU at config load, tests/unit/config/test_parallelism.py); "
                               "tests/gpu covers it where a GPU is lent",
    "train.progress_bar": "cosmetic (a tqdm bar on stderr); tests/unit/test_loop.py pins that it can be turned off",
    "train.device": "cpu and auto are the same device on a machine without CUDA; cuda there is rejected "
                    "(tests/unit/config/test_compose.py), and tests/gpu runs on auto=cuda",
    "train.eval_batch_size": "how many rows one eval forward holds: the loss is the same by design; "
                             "tests/unit/test_loop.py::test_eval_batch_size_sets_the_rows_of_each_eval_forward",
    "resume": "tests/integration/test_resume.py resumes bit-exactly from each kind of checkpoint",
    "overwrite": "only acts on a run dir that holds a run; tests/integration/test_run_faults.py "
                 "(test_overwrite_deletes_the_old_outputs_and_starts_again)",
    "allow_resume_changes": "only acts on a resume whose config differs; tests/integration/test_run_faults.py "
                            "(test_an_allowed_change_follows_the_new_schedule_from_the_checkpoint)",
    "task.answer_column": "the debug model never writes a right answer, so the accuracy it feeds is 0 either way; "
                          "tests/unit/tasks/test_grpo_config.py pins that it picks the column accuracy compares with",
    "peft.loftq_bits": "peft=loftq needs CUDA (rejected on CPU); tests/gpu/test_loftq_cuda.py",
    "peft.loftq_iter": "peft=loftq needs CUDA (rejected on CPU); tests/gpu/test_loftq_cuda.py",
}

# Settings the rejection half tries, in order, to find one where a conditional field does not apply.
NOT_APPLYING_CANDIDATES = [[], ["resume=auto"], ["task=grpo"], ["task=grpo", "task.reward=[format]"],
                           ["task=grpo", "task.loss_type=rft"], ["task=dpo"],
                           ["task=orpo"], ["task=simpo"], ["task=pretrain"], ["data.val_split=0"], ["sched=constant"], ["optim=adafactor"], ["model=hf", "model.path=/nowhere"],
                           ["task=dpo", *LORA], ["task=rloo"], ["task=ppo", "task.ppo_epochs=1"],
                           ["task=ppo", "task.kl_coef=0"], ["task=distill"], ["task=embedding"],
                           ["task=embedding", "task.loss=cosine"]]


def all_fields() -> dict[str, object]:
    """{dotted path: schema default} over every schema (the root, each group, the preference task)."""
    fields = {name: getattr(SoupConfig(), name) for name in ROOT_VALUES}
    for group, schema in GROUP_SCHEMAS.items():
        fields.update(leaf_fields(schema, f"{group}."))
    fields.update(leaf_fields(PreferenceTaskConfig, "task."))
    fields.update({path: default for path, default in leaf_fields(GRPOTaskConfig, "task.").items() if path not in fields})
    fields.update(leaf_fields(RewardModelTaskConfig, "task."))
    fields.update(leaf_fields(PRMTaskConfig, "task."))
    fields.update({path: default for path, default in leaf_fields(PPOTaskConfig, "task.").items() if path not in fields})
    fields.update({path: default for path, default in leaf_fields(DistillTaskConfig, "task.").items()
                   if path not in fields})
    fields.update(leaf_fields(ClassifierTaskConfig, "task."))
    fields.update(leaf_fields(EmbeddingTaskConfig, "task."))
    fields.update(leaf_fields(TrainConfig, "train."))
    return fields


def merged(*lists: list[str]) -> list[str]:
    """Overrides with one value per key, the later list winning (Hydra refuses a key given twice)."""
    by_key: dict[str, str] = {}
    for override in (o for lst in lists for o in lst):
        by_key[override.split("=", 1)[0]] = override
    return list(by_key.values())


def make(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=overrides)


def as_override(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, str):
        return f"'{value}'"  # quoted: Hydra's grammar would read a leading ~ as a deletion
    return str(value)


# --- the observable fingerprint of a run ------------------------------------------------
IGNORED_METRICS = {"time", "peak_memory_mb"}


def is_timing(key: str) -> bool:
    """Wall-clock figures differ between any two runs, so they are no evidence that a field acts."""
    return key in IGNORED_METRICS or key.startswith("time/") or key.endswith("_per_s")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fingerprint(overrides: list[str], run_dir: Path) -> dict:
    """What one run observably did: error, log, metrics, saved files (bytes), parameter counts."""
    from soup.train import run

    out = io.StringIO()
    error = None
    try:
        cfg = make(overrides)
        with contextlib.redirect_stdout(out):
            run(cfg, run_dir, overrides)
    except SoupError as exc:
        error = f"{type(exc).__name__}: {exc}"
    log = [re.sub(r"offline-run-\w+-\w+|run-\d+_\d+-\w+|wandb run \w+", "<wandb>", line.replace(str(run_dir), "<run>"))
           for line in out.getvalue().splitlines() if line.startswith("[soup]")]
    metrics = []
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            metrics.append({k: v for k, v in json.loads(line).items() if not is_timing(k)})
    files = {}
    for path in sorted(run_dir.rglob("*")) if run_dir.exists() else []:
        rel = path.relative_to(run_dir).as_posix()
        if path.is_dir() or rel in ("run.json", "loss.png", "metrics.jsonl") or "wandb" in rel or \
                rel.startswith("tensorboard/"):
            files.setdefault(rel.split("/")[0], "dir")
            continue
        files[rel] = _digest(path) if rel.startswith(("final/", "initial_adapter/")) or \
            rel.endswith("model.safetensors") else "file"
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    params = (record.get("stats", record).get("parameters"), record.get("stats", record).get("trainable_parameters"))
    return {"error": error, "log": log, "metrics": metrics, "files": files, "params": params}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Model directories and data files the LIVE table refers to by placeholder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from soup.models.tokenizer import build_byte_tokenizer

    root = tmp_path_factory.mktemp("liveness")
    tokenizer = build_byte_tokenizer()
    arch = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    for name, seed in (("hf", 0), ("hf_other", 1)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(LlamaConfig(**arch)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    # A model whose class lives in its own directory: transformers runs that code only when trusted.
    remote = root / "remote"
    remote.mkdir()
    (remote / "configuration_probe.py").write_text(
        "from transformers import LlamaConfig\n\nclass ProbeConfig(LlamaConfig):\n    model_type = 'soup_probe'\n")
    (remote / "modeling_probe.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_probe import ProbeConfig\n\n"
        "class ProbeForCausalLM(LlamaForCausalLM):\n    config_class = ProbeConfig\n")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**arch)).save_pretrained(remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="soup_probe", architectures=["ProbeForCausalLM"],
                  auto_map={"AutoConfig": "configuration_probe.ProbeConfig",
                            "AutoModelForCausalLM": "modeling_probe.ProbeForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(remote)
    # A reward model that shares the byte tokenizer: task=ppo's value model can start from it.
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(2)
    LlamaForSequenceClassification(LlamaConfig(**arch, num_labels=1)).save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    # The byte tokenizer with two more special tokens: a larger vocabulary, so a larger model.
    bigger = build_byte_tokenizer()
    bigger.add_special_tokens({"additional_special_tokens": ["<|probe_a|>", "<|probe_b|>"]})
    bigger.save_pretrained(root / "tokenizer")
    rows = [{"instruction": f"Say the number {i} in words.", "input": "", "output": f"It is number {i}."}
            for i in range(30)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = [{"text": f"The first story number {i} is short.", "body": f"A different body of text, {i * 7}."}
            for i in range(30)]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    # Rows that two formats can read (chatml first by detection, alpaca when data.format says so).
    dual = [{**row, "messages": [{"role": "user", "content": f"Count to {i}."},
                                 {"role": "assistant", "content": " ".join(map(str, range(i % 5 + 1)))}]}
            for i, row in enumerate(rows)]
    (root / "dual.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dual))
    (root / "len_reward.py").write_text("def reward_fn(completions, **columns):\n"
                                        "    return [len(c) / 10 for c in completions]\n")
    reviews = [{"text": f"Review {i}: it was {'good' if i % 2 else 'bad'}.", "other": f"Item {i * 7} of the shop.",
                "label": "pos" if i % 2 else "neg", "index": i % 2, "topic": ["food", "film", "book"][i % 3]} for i in range(30)]
    (root / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    pairs = [{"anchor": f"Scene {i}: a {['cat', 'dog', 'bird'][i % 3]} sleeps.", "positive": f"A pet naps ({i}).",
              "negative": f"Scene {i + 1}: nobody is there.", "query": f"Where is thing {i}?",
              "passage": f"Thing {i} is in box {i % 4}."} for i in range(30)]
    (root / "emb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    scored = [{"sentence1": f"A {['cat', 'dog', 'bird'][i % 3]} sleeps ({i}).", "sentence2": f"A pet naps ({i % 5}).",
               "score": (i % 5) / 5, "rating": ((i * 3) % 7) / 7} for i in range(30)]
    (root / "emb_scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))
    (root / "gate_suite.yaml").write_text("tasks:\n  capitals:\n    kind: multiple_choice\n"
                                          "    file: pkg://demo/choice.jsonl\n    max_rows: 4\n")
    (root / "gate_baseline.json").write_text(json.dumps({"metrics": {"capitals/acc": 1.0, "capitals/acc_norm": 1.0}}))
    questions = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in questions))
    return {"questions_file": root / "questions.jsonl","hf": root / "hf", "hf_other": root / "hf_other", "remote": remote, "tokenizer": root / "tokenizer",
            "sft_file": root / "sft.jsonl", "text_file": root / "text.jsonl", "dual_file": root / "dual.jsonl",
            "len_reward": root / "len_reward.py", "rm": root / "rm", "cls_file": root / "cls.jsonl",
            "emb_file": root / "emb.jsonl", "emb_scored_file": root / "emb_scored.jsonl",
            "gate_suite": root / "gate_suite.yaml", "gate_baseline": root / "gate_baseline.json", "root": root}


class Runner:
    """Runs fingerprints, each in its own directory, caching the base settings."""

    def __init__(self, paths: dict):
        self.paths, self.cache, self.count = paths, {}, 0

    def fill(self, overrides: list[str]) -> list[str]:
        """Overrides with the placeholders ({hf}, {tmp}, ...) replaced by real paths."""
        filled = []
        for override in overrides:
            for name, path in {**self.paths, "tmp": self.paths["root"]}.items():
                override = override.replace("{" + name + "}", str(path))
            filled.append(override)
        return filled

    def __call__(self, overrides: list[str]) -> dict:
        key = tuple(overrides)
        if key not in self.cache:
            self.count += 1
            self.cache[key] = fingerprint(self.fill(overrides), self.paths["root"] / "runs" / f"run{self.count}")
        return self.cache[key]


@pytest.fixture(scope="module")
def runner(paths):
    return Runner(paths)


def test_every_field_is_live_or_exempt():
    missing = sorted(set(all_fields()) - set(LIVE) - set(EXEMPT))
    assert not missing, f"fields neither shown live nor exempted (add them to LIVE or EXEMPT): {missing}"
    stale = sorted((set(LIVE) | set(EXEMPT)) - set(all_fields()))
    assert not stale, f"LIVE/EXEMPT name fields that no longer exist: {stale}"
    assert not set(LIVE) & set(EXEMPT)


def test_the_fingerprint_of_a_run_is_reproducible(runner, paths):
    first = fingerprint(runner.fill(BASE), paths["root"] / "repeat-a")
    second = fingerprint(runner.fill(BASE), paths["root"] / "repeat-b")
    assert first["error"] is None, first["error"]
    assert first == second


@pytest.mark.parametrize("field", sorted(LIVE))
def test_changing_a_field_where_it_applies_changes_the_run(field, runner):
    setting, change = LIVE[field]
    scope = field_scopes().get(field)
    if scope is not None:
        cfg = make(runner.fill(merged(BASE, setting)))
        assert scope.applies(cfg), f"the LIVE setting {setting} for {field} is one where it does not apply"
    before = runner(merged(BASE, setting))
    after = runner(merged(BASE, setting, change))
    expected_base_error = BASE_ERRORS.get(field)
    if expected_base_error:
        assert before["error"] and expected_base_error in before["error"], before["error"]
    else:
        assert before["error"] is None, f"the base run of {field} failed: {before['error']}"
    assert after["error"] is None, f"{field}: {change} failed: {after['error']}"
    differs = [part for part in ("error", "metrics", "files", "params", "log") if before[part] != after[part]]
    assert differs, f"{change} changed nothing observable in the setting {setting}"


@pytest.mark.parametrize("field", sorted(field_scopes()))
def test_setting_a_field_where_it_does_not_apply_is_rejected(field):
    scope = field_scopes()[field]
    default = all_fields()[field]
    explicit = f"{field}={as_override(default)}"
    for candidate in NOT_APPLYING_CANDIDATES:
        overrides = merged(candidate, [explicit])
        try:
            cfg = make(overrides)
            applies = scope.applies(cfg)
        except Exception:  # the field does not exist there (task.beta with task=sft): compose refuses it
            continue
        if not applies:
            break
    else:
        pytest.fail(f"no setting in NOT_APPLYING_CANDIDATES leaves {field} unread: add one")
    with pytest.raises(ConfigError) as info:
        validate(cfg, overrides)
    assert f"{field}=" in str(info.value) and "this run does not read it" in str(info.value)


def test_a_default_that_the_run_does_not_read_is_not_an_error():
    # Only what the command line (or an experiment preset) names counts as set: the debug
    # preset's model.tiny.* shape does not stop a model=hf run.
    overrides = ["debug=tiny", "model=hf", "model.path=/nowhere"]
    validate(make(overrides), overrides)


def test_a_key_outside_the_schemas_is_rejected_with_a_suggestion():
    overrides = ["+train.max_stepz=5"]
    with pytest.raises(ConfigError, match=r"train\.max_stepz is not a soup option \(did you mean train\.max_steps\?\)"):
        validate(make(overrides), overrides)


def test_run_length_is_one_rule():
    cfg = make(["train.epochs=3"])  # the demo data's train.max_steps=150 gives way to the command line
    validate(cfg, ["train.epochs=3"])
    assert cfg.train.max_steps is None and cfg.train.epochs == 3
    both = ["train.epochs=3", "train.max_steps=5"]
    with pytest.raises(ConfigError, match="both set the run's length"):
        validate(make(both), both)
    file_data = ["data=file", "data.train_file=x.jsonl"]
    cfg = make(file_data)
    validate(cfg, file_data)
    assert cfg.train.max_steps is None and cfg.train.epochs is None  # one epoch


def test_eval_follows_the_data():
    no_val = ["data=file", "data.train_file=x.jsonl"]
    validate(make(no_val), no_val)  # no validation data: no eval, no error
    explicit = [*no_val, "train.eval_every_steps=10"]
    with pytest.raises(ConfigError, match=r"train\.eval_every_steps=10 is set, but this run does not read it"):
        validate(make(explicit), explicit)
