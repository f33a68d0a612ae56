"""Structured-config schemas: one dataclass per config group.

Every yaml option in conf/<group>/ starts with `defaults: [<group>_schema, _self_]`,
so Hydra checks its keys and types against the dataclass here. A typo, an unknown
key or a wrong type fails at compose time with Hydra's own message. Rules that
involve more than one group live in soup/config/validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TaskConfig:
    """What the run optimises.

    sft: next-token loss on the response tokens of chat/instruction data.
    pretrain: next-token loss on every token of plain documents.
    """

    name: str = MISSING


@dataclass
class PreferenceTaskConfig(TaskConfig):
    """Preference optimisation: dpo, ipo, kto, orpo, simpo, cpo, bco, or `preference`
    with `preference_loss=<registered loss>`. Losses live in soup/losses/ (registry).

    A field that the chosen loss does not read must stay at its default; validation
    rejects it otherwise, naming the losses that do read it.
    """

    # task=preference: the registered loss to train (e.g. sigmoid, hinge, simpo, bco_pair).
    preference_loss: Optional[str] = None
    # task=dpo: the DPO variant (sigmoid, hinge, ipo, robust, exo_pair, nca_pair, bco_pair,
    # sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm).
    loss_type: str = "sigmoid"
    # Weighted sum of 2-5 losses, e.g. {sigmoid: 0.7, bco_pair: 0.3}; weights sum to 1.
    preference_loss_weights: Any = None
    beta: float = 0.1
    # constant | linear | cosine | exponential: beta moves from `beta` to `beta_end` over the run.
    beta_schedule: str = "constant"
    beta_end: Optional[float] = None
    label_smoothing: float = 0.0
    # RPO-style NLL on the chosen answer, added with this weight to a DPO variant.
    rpo_alpha: Optional[float] = None
    # auto | copy | adapter | precomputed | none. auto: adapter with peft, else copy; none for
    # reference-free losses. precomputed: one pass before training, cached on disk.
    reference: str = "auto"
    # How the precomputed reference is built: copy or adapter (auto picks as above).
    precompute_with: str = "auto"
    ref_cache_dir: str = "~/.cache/soup/reference_logps"
    # Copy the policy's weights into the reference every N epochs (reference=copy); 0 = never.
    ref_refresh_epochs: int = 0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    orpo_lambda: float = 0.1
    discopop_tau: float = 0.05
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # How a batch is laid out for the forward pass: shared_prompt (one unit per example:
    # prompt once, then both completions, masked so neither sees the other; units packed
    # into rows; needs sdpa or eager attention), stacked (prompt+chosen rows then
    # prompt+rejected rows), or auto (shared_prompt where the attention takes a 4-D mask).
    # Both give the same log-probs; shared_prompt skips the second pass over each prompt.
    sequence_layout: str = "auto"


@dataclass
class RewardModelTaskConfig(TaskConfig):
    """task=reward_model: a score head on the decoder trained with the Bradley-Terry loss on
    {prompt, chosen, rejected} rows (soup/tasks/reward_model.py); a row's `margin` column asks
    the chosen reward to lead by that much (Llama 2)."""

    # eta of eta * (r_chosen + r_rejected)^2 per pair (Eisenstein et al. 2023): keeps rewards
    # centred on zero; null leaves it out. Small values (0.01) only anchor the offset.
    center_rewards_coefficient: Optional[float] = None


@dataclass
class PRMTaskConfig(TaskConfig):
    """task=prm: a process reward model, a two-class token classifier that scores each
    reasoning step of {prompt, completions, labels} rows (soup/tasks/prm.py)."""

    # Text after every step; the step's label sits on its last token.
    step_separator: str = "\n"
    # Label only each row's last step (an outcome label on the final answer).
    train_on_last_step_only: bool = False


@dataclass
class OnlineTaskConfig(TaskConfig):
    """What the online tasks (grpo, rloo, ppo) share: the prompts, how completions are sampled
    from the policy, and the rewards that score them (soup/rollout/engine.py, soup/rewards/)."""

    # Reward functions: registered names (accuracy, math, format, code, json_schema), paths
    # to .py files defining reward_fn(completions, **columns), or the directory of a saved
    # reward model (task=reward_model's final/); `reward_weights` one weight each.
    reward: Any = field(default_factory=lambda: ["accuracy"])
    reward_weights: Any = None
    max_completion_length: int = 64
    # Sampling: temperature 0 is greedy.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # Wraps each text prompt (a `prompt` string or a GSM8K `question`): r1_zero (DeepSeek-R1-Zero's
    # <think>/<answer> template) or a text holding {prompt}. null: the prompt as written.
    prompt_template: Optional[str] = None
    # Strings that end a completion (besides EOS and the template's end of turn), e.g. ["</answer>"].
    stop: Any = None
    # The format reward's regex: <think>...</think> then an answer.
    format_pattern: str = r"^\s*<think>.*?</think>\s*\S.*$"
    # The row column the accuracy and math rewards compare with.
    answer_column: str = "answer"


@dataclass
class GRPOTaskConfig(OnlineTaskConfig):
    """Online RL (task=grpo, and task=rloo, REINFORCE leave-one-out, which shares it): sample
    num_generations completions per prompt from the policy,
    score them with `reward`, and optimise a GRPO-family objective (soup/losses/grpo.py,
    soup/tasks/grpo.py). Names follow TRL's GRPOConfig."""

    num_generations: int = 4
    # grpo | bnpo | dr_grpo | dapo: the clipped objective with that reduction of token losses;
    # cispo: MiniMax-M1's clipped IS weight; rft: fine-tuning on each group's best completions
    # (both reduce as dapo). Formulas: soup/losses/grpo.py.
    loss_type: str = "dapo"
    # group | batch | none: the std that divides the group-centred rewards (none: Dr. GRPO).
    scale_rewards: str = "group"
    # KL to the reference (k3); 0 builds no reference.
    beta: float = 0.0
    # Optimizer steps per generation batch (mu). The importance ratio moves from 1 only when a
    # batch is trained on again (mu > 1) or replayed, so the clip settings below act only then.
    num_iterations: int = 1
    epsilon: float = 0.2
    # Upper clip 1 + epsilon_high (DAPO's clip-higher; cispo's weight cap). null: epsilon.
    epsilon_high: Optional[float] = None
    # Two-sided clipping (INTELLECT-2): the ratio is capped at delta (> 1) before the min.
    delta: Optional[float] = None
    # token | sequence (GSPO: one length-normalised ratio per completion).
    importance_sampling_level: str = "token"
    # Truncated importance sampling: token losses x min(exp(old - sampler log-prob), tis_threshold).
    tis_threshold: Optional[float] = None
    # Completions that hit max_completion_length train nothing (their rewards still count).
    mask_truncated_completions: bool = False
    # Groups whose rewards are all equal (zero advantage) leave the step, and its token count.
    skip_zero_advantage: bool = False
    # DeepSeek-V3.2: drop a completion with A < 0 whose mean KL(sampler || policy) exceeds this.
    off_policy_mask_threshold: Optional[float] = None
    # Groups kept (by reward std) to stand in for groups whose rewards were all equal; 0: none.
    replay_buffer_size: int = 0
    # Every ref_sync_steps steps the reference copy moves: ref <- alpha x policy + (1 - alpha) x ref.
    ref_sync_steps: int = 0
    ref_model_ema_alpha: float = 1.0
    # task=rloo: the KL to the reference enters each completion's reward (reward - beta x the
    # completion's summed log pi - log pi_ref, as the RLOO paper) instead of the loss (k3 x beta).
    kl_in_reward: bool = True


@dataclass
class PPOTaskConfig(OnlineTaskConfig):
    """task=ppo (RLHF with PPO, soup/tasks/ppo.py, formulas in soup/losses/ppo.py): one completion
    per prompt, scored by `reward` (a reward model's directory, or any reward above), a per-token
    KL penalty to the reference, GAE over a value model's estimates, and PPO's clipped policy
    and value losses. A rollout batch is train.micro_batch_size x train.grad_accum_steps prompts;
    it is trained on for ppo_epochs passes of num_mini_batches optimizer steps each."""

    # What the value model starts from: reward_model (the reward model of task.reward, its score
    # head read at every token), policy (the policy's weights, a new score head), or auto
    # (reward_model when task.reward names one, else policy).
    value_init: str = "auto"
    # The KL penalty's coefficient (Ziegler et al.'s beta); 0 builds no reference.
    kl_coef: float = 0.05
    # k1 (log pi - log pi_ref) | k3 (Schulman's non-negative estimator) for the per-token KL.
    kl_estimator: str = "k1"
    # Adaptive KL (Ziegler et al. sec. 2.2): steer the summed KL per completion toward target_kl
    # over kl_horizon completions. null: kl_coef stays fixed.
    target_kl: Optional[float] = None
    kl_horizon: float = 10000.0
    # Subtracted from the score of a completion that ends without EOS (hits max_completion_length).
    missing_eos_penalty: Optional[float] = None
    # Scale the per-token rewards to unit variance over the batch (mean kept).
    whiten_rewards: bool = False
    # GAE's discount and lambda (Huang et al.: gamma 1, lam 0.95).
    gamma: float = 1.0
    lam: float = 0.95
    # PPO's clip of the policy ratio, and of the value's move from its value at rollout.
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    # Weight of the value loss beside the policy loss (one optimizer over both models).
    vf_coef: float = 0.1
    # Passes over each rollout batch, and optimizer steps (mini-batches) per pass.
    ppo_epochs: int = 4
    num_mini_batches: int = 1


@dataclass
class ClassifierTaskConfig(TaskConfig):
    """task=classifier: sequence classification, regression or cross-encoder scoring with a score
    head (soup/tasks/classifier.py, rows in soup/data/classification.py)."""

    # The text, the optional second text of a pair (a reranker's document), and the label.
    text_column: str = "text"
    pair_column: Optional[str] = None
    label_column: str = "label"
    # null: counted from the train labels; 1: a regression on float labels.
    num_labels: Optional[int] = None
    # null (every row weighs 1), balanced (rows / (classes x rows of the class)), or one weight per class.
    class_weights: Any = None


@dataclass
class EmbeddingTaskConfig(TaskConfig):
    """task=embedding: contrastive sentence embeddings from the model's hidden states
    (soup/tasks/embedding.py, rows in soup/data/embedding.py, losses in soup/losses/embedding.py)."""

    # info_nce (in-batch negatives on {anchor, positive[, negative...]} rows) | cosent | cosine
    # (cosine-similarity regression); cosent and cosine train on scored pairs {sentence1, sentence2, score}.
    loss: str = "info_nce"
    # Multiplies the cosines inside info_nce's softmax and CoSENT's log-sum-exp: 1 / temperature.
    scale: float = 20.0
    # info_nce: also make each positive pick its anchor among the batch's anchors; the two averaged.
    symmetric: bool = False
    # auto (last for a decoder LM, mean for an encoder) | mean | cls | last, over the real tokens.
    pooling: str = "auto"
    # Matryoshka: also train the first d dimensions of the embedding for each d listed; losses summed.
    matryoshka_dims: Optional[List[int]] = None
    # One weight per matryoshka dim (null: 1 each).
    matryoshka_weights: Optional[List[float]] = None
    # The two texts of a row (null: anchor and positive, or sentence1 and sentence2, as the file has them).
    text_columns: Optional[List[str]] = None
    # Rows carrying this column are scored pairs (cosent/cosine training, Spearman evaluation).
    score_column: str = "score"
    # info_nce's hard negatives, one text per column (null: the columns named negative or negative_<n>).
    negative_columns: Optional[List[str]] = None
    # cosine: the regression target is score / score_scale (STS-B's 0-5 scores: 5), which must lie in [-1, 1].
    score_scale: float = 1.0


@dataclass
class TeacherConfig:
    # A causal LM directory (or hub id) with the student's tokenizer.
    path: Optional[str] = None
    # none | 8bit | 4bit: load the frozen teacher with bitsandbytes weights (quant=4bit's nf4 settings).
    quant: str = "none"
    # Offline teacher: its top-k log-probs at every trained position, computed once before training
    # and cached on disk (keyed by the teacher's weights and the token ids); the teacher is then
    # unloaded. null: the teacher stays loaded and gives full distributions every step.
    top_k: Optional[int] = None
    cache_dir: str = "~/.cache/soup/teacher_topk"


@dataclass
class DistillTaskConfig(TaskConfig):
    """task=distill: the run's model (the student) learns a teacher's next-token distributions
    on SFT rows (soup/tasks/distill.py, formulas in soup/losses/distill.py)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # forward_kl (KL(teacher || student), Hinton's) | reverse_kl | generalized_jsd (GKD).
    divergence: str = "forward_kl"
    # generalized_jsd's mixture weight: 0 is forward KL, 1 reverse KL, 0.5 the symmetric JSD.
    jsd_beta: float = 0.5
    # Both distributions are softmax(logits / temperature); the divergence is scaled by T^2 (Hinton et al.).
    temperature: float = 1.0
    # Weight of the divergence; 1 - alpha weighs the student's cross-entropy on the data's tokens.
    alpha: float = 0.5
    # On-policy distillation (GKD): the probability that a step trains on completions the student
    # samples itself (temperature 1, from the rows' prompts), on which only the divergence is taken.
    lmbda: float = 0.0
    # The longest completion the student samples on an on-policy step.
    max_new_tokens: int = 128


@dataclass
class TinyArchConfig:
    """Shape of the Llama-architecture model that `model=tiny` builds from scratch."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclass
class ModelConfig:
    """Which model to train.

    name=tiny builds a randomly initialised Llama (shape in `tiny`) and a byte-level
    tokenizer offline. name=hf loads `path` (a local directory or a hub id) with
    transformers.
    """

    name: str = MISSING
    path: Optional[str] = None
    # A separate tokenizer directory; defaults to `path` (hf) or the built-in byte tokenizer (tiny).
    tokenizer_path: Optional[str] = None
    # Parameter dtype at load: float32 | bfloat16 | float16. Mixed precision is train.precision.
    dtype: str = "float32"
    # transformers attention implementation: sdpa | eager | flash_attention_2 (CUDA).
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    tiny: TinyArchConfig = field(default_factory=TinyArchConfig)


@dataclass
class DataConfig:
    """Where the training rows come from and how they become tokens."""

    name: str = MISSING
    train_file: Optional[str] = None
    val_file: Optional[str] = None
    # auto | alpaca | sharegpt | chatml | plaintext | tool_calling
    format: str = "auto"
    # null = the tokenizer's own template; a preset (chatml, llama3); or a raw Jinja string.
    chat_template: Optional[str] = None
    max_length: int = 512
    # What happens to a row longer than max_length (counts are reported): truncate (keep the
    # first max_length tokens; a row left with nothing to train is an error naming it), drop,
    # or truncate_or_drop (truncate, and drop only the rows the cut leaves with nothing to train).
    overlong: str = "truncate"
    # Fraction of the training rows held out for validation when no val_file is given.
    val_split: float = 0.0
    train_on_responses_only: bool = True
    # Use only the first N rows of the training file (None = all).
    max_rows: Optional[int] = None
    # The field holding a document for plaintext data.
    text_field: str = "text"
    # Concatenate examples into rows of max_length (position ids restart per document).
    packing: bool = False
    # With packing: attention stays inside each document (block-diagonal causal mask).
    packing_cross_doc_attn_mask: bool = False
    # First-Fit-Decreasing bins of at most micro_batch_size x max_length tokens per micro-batch.
    multipack: bool = False
    # How a bin's examples form the micro-batch: packed (examples end to end in rows of
    # max_length, attention kept inside each example, rows binned micro_batch_size at a
    # time) or padded (one example per row, padded to the bin's longest; no 4-D mask).
    multipack_layout: str = "packed"
    multipack_max_items_per_bin: Optional[int] = None
    multipack_max_mask_cells: Optional[int] = None
    # Preference tasks: caps on the prompt (keeps its end) and each completion (keeps its start).
    max_prompt_length: Optional[int] = None
    max_completion_length: Optional[int] = None


@dataclass
class BackendConfig:
    """The modelling library that runs forward/backward: transformers, the only option
    today. The group is the place a second library would go; it selects nothing else."""

    name: str = MISSING


@dataclass
class QuantConfig:
    """Quantised or low-precision base weights.

    4bit / 8bit: bitsandbytes weights, frozen, trained through adapters (4bit + peft=lora
    is QLoRA, arXiv 2305.14314).
    fp8: torchao float8 training of the linear layers (CUDA compute capability >= 8.9;
    emulated on CPU for testing). int8_qat: quantisation-aware training with torchao
    fake quantisation (int8 activations, int8 or int4 weights); final/ holds the converted
    quantised model.
    """

    name: str = MISSING
    # fp8: tensorwise | rowwise | rowwise_with_gw_hp
    fp8_recipe: str = "tensorwise"
    # int8_qat: weight quantisation group size.
    qat_group_size: int = 32
    # int8_qat: bits of the fake-quantised (and, in final/, converted) weights: 8 | 4 (torchao's 8da4w).
    qat_weight_bits: int = 8
    # 4bit: nf4 | fp4, nested (double) quantisation of the scales, the dtype matmuls run in,
    # and the storage dtype of packed weights (uint8, or e.g. bfloat16 for FSDP).
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"
    quant_storage: str = "uint8"


@dataclass
class KernelsConfig:
    """Fused kernels and compilation: none | liger | flash_attn | compile | auto.

    cut_ce decides how the loss meets the LM head, with any of them: off (the head on
    labelled positions, then cross-entropy), chunked (our chunked linear cross-entropy,
    never materialising [tokens x vocab] logits), cce (the cut-cross-entropy package).
    """

    name: str = MISSING
    cut_ce: str = "off"
    # Rows per chunk: the peak extra memory is about chunk x vocab x 4 bytes (256 MiB at 128k vocab).
    ce_chunk_size: int = 512


@dataclass
class CheckpointingConfig:
    """Gradient (activation) checkpointing tier: none | full | medium | selective | auto."""

    name: str = MISSING


@dataclass
class OffloadConfig:
    """Activation offloading target: none | cpu (pinned host memory, CUDA) | disk."""

    name: str = MISSING
    # disk: where saved activations go, relative to the run directory (must stay inside it).
    scratch_dir: str = "offload_scratch"
    # Saved tensors smaller than this stay in memory.
    min_bytes: int = 65536


@dataclass
class ParallelismConfig:
    """How the model is spread over processes: single (one process, one device), ddp
    (one process per rank under torchrun, a full copy each, gradients averaged), fsdp2
    (one process per rank, every weight, gradient and optimizer state sharded), or
    deepspeed_zero2 / deepspeed_zero3 (DeepSpeed's ZeRO: optimizer state and gradients
    split, and with stage 3 the weights too)."""

    name: str = MISSING
    # fsdp2: free a block's gathered weights after its forward; keep shards in host memory (CUDA).
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    # deepspeed_zero2/3: the optimizer state (zero3: offload_param, the weights too) in host memory (CUDA).
    offload_optimizer: bool = False
    offload_param: bool = False


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (through peft). name=none trains every parameter.

    lora | dora (weight-decomposed) | rslora (alpha / sqrt(r) scaling) | vera (shared
    random projections, trained scaling vectors) | olora | pissa (principal-component
    init) | loftq (quantisation-aware init). Each is one yaml in conf/peft/.
    """

    name: str = MISSING
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # "all-linear", a list of module-name suffixes (e.g. [q_proj, v_proj]), or a regex string.
    target_modules: Any = "all-linear"
    # Per-module rank / alpha by regex, e.g. {"q_proj": 16}.
    rank_pattern: Any = None
    alpha_pattern: Any = None
    # Adapter init: default (peft's), gaussian, or the variant's own (olora, pissa, loftq set it).
    init: str = "default"
    # loftq: bits of the quantised base approximation and alternating iterations.
    loftq_bits: int = 4
    loftq_iter: int = 1
    # vera: initial value of the trained scaling vector d.
    vera_d_initial: float = 0.1
    # Freeze the bottom N decoder layers (or a fraction of them); adapters go on the rest only.
    freeze_layers: int = 0
    freeze_ratio: float = 0.0
    # LoRA+ (arXiv 2402.12354): the B matrices train at lr x this ratio.
    loraplus_lr_ratio: Optional[float] = None


@dataclass
class OptimConfig:
    """Optimizer. Weight decay never applies to biases or normalisation weights.

    Each optimizer reads lr, weight_decay, lr_groups and its own fields below (soup/optim.py
    lists which); the others must keep their defaults.
    """

    name: str = MISSING
    lr: float = 3e-4
    weight_decay: float = 0.0
    # Adam-family and Lion moments (Lion's usual betas are [0.9, 0.99]; it reads no eps).
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # SGD only.
    momentum: float = 0.0
    nesterov: bool = False
    # adamw only: auto | fused | foreach | for_loop. auto = fused where torch has the kernel
    # (CUDA and CPU in torch 2.13), else foreach.
    implementation: str = "auto"
    # galore only (arXiv 2403.03507): rank of the gradient projection of each decoder matrix,
    # steps between SVDs that refresh the projection, scale of the projected-back update,
    # and which side is projected (std | reverse_std | left | right | full).
    galore_rank: int = 128
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    galore_proj_type: str = "std"
    # Per-module learning rates: [{pattern: "regex over parameter names", lr: 1e-5}, ...]; first match wins.
    lr_groups: Any = None


@dataclass
class SchedConfig:
    """Learning-rate schedule with linear warmup of warmup_steps, or warmup_ratio of the run.

    Set one: a command-line value replaces the other's default from the option's yaml
    (cosine and linear default to warmup_ratio=0.05); both set is an error."""

    name: str = MISSING
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    # Final lr as a fraction of the peak (linear and cosine).
    min_lr_ratio: float = 0.0


@dataclass
class TrackerConfig:
    """Where per-step metrics go besides metrics.jsonl (always written)."""

    name: str = MISSING
    project: str = "soup"
    # wandb: offline | online | disabled. Offline needs no network.
    mode: str = "offline"


@dataclass
class TrainConfig:
    """The loop: batch shape, length, precision, cadence of eval/checkpoints/logs."""

    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    # The run's length: max_steps optimizer steps, or `epochs` passes over the data (one
    # pass when both are null). Set one; a command-line value replaces a config file's
    # default for the other (the demo data sets max_steps=150). Both set is an error.
    max_steps: Optional[int] = None
    epochs: Optional[int] = None
    # fp32 | bf16 (autocast, CPU and CUDA; refused on a CPU without a fast bf16 path) | fp16 (autocast
    # + grad scaler, CUDA only) | auto (bf16 where the GPU or CPU has native bf16, else fp32; soup/precision.py)
    precision: str = "fp32"
    max_grad_norm: float = 1.0
    # Evaluate on the validation data every N steps (0: only at the end). Evaluation follows
    # the data: with no validation split or file there is none, and the eval flags are errors.
    eval_every_steps: int = 0
    # Also evaluate before the first step (a fresh run only), as the baseline of the curve.
    eval_at_start: bool = False
    eval_batch_size: int = 16
    save_every_steps: int = 0
    keep_last_checkpoints: int = 2
    log_every_steps: int = 1
    progress_bar: bool = True
    # cpu | cuda | auto
    device: str = "auto"
    # NEFTune (arXiv 2310.05914): uniform noise of scale alpha / sqrt(L x d) on the input
    # embeddings, in training only. null = off.
    neftune_alpha: Optional[float] = None
    # Loss-spike recovery (soup/stability.py): a step whose loss is above spike_factor x the median
    # of the last spike_window steps, or not finite, is not applied; the run rolls back to its newest
    # checkpoint, skips the data drawn since, multiplies the lr by spike_lr_factor (per recovery) and
    # goes on, and stops after spike_max_recoveries. null: off (a non-finite loss stops the run).
    spike_factor: Optional[float] = None
    spike_window: int = 20
    spike_max_recoveries: int = 3
    spike_lr_factor: float = 1.0
    # The lr range test (soup/lr_finder.py): instead of training, lr_finder_steps steps with the lr
    # growing exponentially from lr_finder_min_lr to lr_finder_max_lr; writes lr_finder.json and
    # lr_finder.png (the curve, the suggested lr) and nothing else.
    lr_finder: bool = False
    lr_finder_min_lr: float = 1e-7
    lr_finder_max_lr: float = 1.0
    lr_finder_steps: int = 100
    # CUDA: before training, the largest micro-batch (a divisor of micro_batch_size x grad_accum_steps)
    # whose forward and backward of the longest rows fit in memory; the accumulation keeps the global batch.
    auto_micro_batch_size: bool = False
    # Eval-gated training (soup/evals/gate.py): a suite file (soup/evals/suite.py) run on the model being
    # trained every eval_gate_every_steps steps or eval_gate_every_epochs epochs. A watched metric
    # (eval_gate_metrics, "<task>/<metric>"; empty: all) worse than its baseline by more than
    # eval_gate_threshold (its own units) is a regression: eval_gate_action stop (checkpoint, then final/;
    # run.json says why) | warn | continue. The baseline: eval_gate_baseline (an eval.json of soup.eval, or
    # its run dir), else this run's own evaluation before step 1. null: no gate.
    eval_gate: Optional[str] = None
    eval_gate_every_steps: int = 0
    eval_gate_every_epochs: int = 0
    eval_gate_metrics: list[str] = field(default_factory=list)
    eval_gate_threshold: float = 0.0
    eval_gate_action: str = "stop"
    eval_gate_baseline: Optional[str] = None


@dataclass
class SoupConfig:
    """The root config: one node per group plus run-level settings."""

    task: TaskConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    backend: BackendConfig = MISSING
    quant: QuantConfig = MISSING
    kernels: KernelsConfig = MISSING
    checkpointing: CheckpointingConfig = MISSING
    offload: OffloadConfig = MISSING
    parallelism: ParallelismConfig = MISSING
    peft: PeftConfig = MISSING
    optim: OptimConfig = MISSING
    sched: SchedConfig = MISSING
    tracker: TrackerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 42
    # null: start fresh; auto: the latest checkpoint in this run dir; or a checkpoint path.
    resume: Optional[str] = None
    # A fresh run (resume=null) refuses a run dir that already holds a run's outputs;
    # true deletes those outputs first (soup/run_dir.py).
    overwrite: bool = False
    # On resume, keys that may change mid-run (run length, eval/save/log cadence, optim.lr,
    # memory features, trackers) are refused unless this is true; then they are applied
    # and recorded in run.json. Every other key must match the checkpoint (soup/config/resume.py).
    allow_resume_changes: bool = False


GROUP_SCHEMAS = {
    "task": TaskConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "backend": BackendConfig,
    "quant": QuantConfig,
    "kernels": KernelsConfig,
    "checkpointing": CheckpointingConfig,
    "offload": OffloadConfig,
    "parallelism": ParallelismConfig,
    "peft": PeftConfig,
    "optim": OptimConfig,
    "sched": SchedConfig,
    "tracker": TrackerConfig,
}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="soup_schema", node=SoupConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
    cs.store(group="task", name="preference_schema", node=PreferenceTaskConfig)
    cs.store(group="task", name="grpo_schema", node=GRPOTaskConfig)
    cs.store(group="task", name="reward_model_schema", node=RewardModelTaskConfig)
    cs.store(group="task", name="prm_schema", node=PRMTaskConfig)
    cs.store(group="task", name="ppo_schema", node=PPOTaskConfig)
    cs.store(group="task", name="distill_schema", node=DistillTaskConfig)
    cs.store(group="task", name="classifier_schema", node=ClassifierTaskConfig)
    cs.store(group="task", name="embedding_schema", node=EmbeddingTaskConfig)
