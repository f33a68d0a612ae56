"""Entry point: sample from a model or a run's final/: a prompts file in batches, or a chat.

    python -m soup.generate checkpoint=outputs/<date>/<time>/final prompts_file=prompts.jsonl
    python -m soup.generate checkpoint=outputs/<date>/<time>/final mode=chat system_prompt="Be brief."
    python -m soup.generate model=hf model.path=../shared/models/stories260k prompts_file=p.jsonl temperature=0

The config is conf/generate.yaml: soup.train's `model` and `quant` groups plus the fields of
soup/generate_config.py. The model is `checkpoint` (a full model, or an adapter on the base
soup.merge would find for it: merged for speed, or kept beside a 4/8-bit base) or the model
group as soup.train builds it.

batch: every row of `prompts_file` (`prompt`: text or chat messages; or `messages`) is rendered
with the chat template and its generation prompt, and `batch_size` rows at a time, in file
order, are sampled by soup's rollout engine (soup/rollout/engine.py). `output_file` (default
<run dir>/generations.jsonl) gets {prompt, completion, finish_reason, tokens} per row, in input
order. One torch.Generator seeded with `seed` makes every draw, so the same seed, file and
batch_size give the same file; at temperature 0 it is greedy decoding.

chat: a conversation on stdin/stdout, the reply printed as it is decoded. The engine returns
a whole batch at the end, so the chat streams from `stream_tokens` below: the engine's
forward over a KV cache and its logits processors (`process_logits`), for one sequence,
yielding each token as it is drawn. Not transformers' TextIteratorStreamer + model.generate:
that runs generate on a second thread and samples with transformers' own processors and RNG,
so the chat would not sample what batch mode samples; here both are one procedure (a test
pins a chat reply to batch mode's completion of the same conversation).

Exit status: 0; 2 for a user mistake (a config flag, the prompts file, a checkpoint), with
the flag or file:line and the fix.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

import hydra
import jinja2
import torch
from omegaconf import DictConfig

from soup.config import resolve_device
from soup.console import hydra_cli, hydra_job
from soup.data.dataset import resolve_data_path
from soup.data.readers import Row, read_rows, row_error
from soup.data.templates import PRESETS, validate_template
from soup.data.tokenize import render_chat
from soup.errors import ConfigError, DataError, SoupError
from soup.generate_config import register_generate_configs, validate_generate
from soup.models.files import model_source
from soup.models.load import DTYPES, build_model, build_tokenizer, load_kwargs
from soup.models.quant import BNB_QUANTS, load_quantized, quantize_built_model
from soup.models.tokenizer import load_tokenizer
from soup.rollout.engine import SamplingParams, process_logits, sample
from soup.tasks.prompts import stop_token_ids

register_generate_configs()
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
USER_ERROR = 2  # as soup.train's
PROMPT_FIX = ("give each row a `prompt` (text, or a list of {role, content} chat messages) or `messages` "
              "(a conversation as a list of {role, content} messages).")


@dataclass
class Prompt:
    """One prompts-file row: what the output row repeats as its `prompt`, and the tokens sampled from."""

    row: Row
    shown: Any  # the row's text or messages (without a final assistant turn)
    ids: list[int] = field(default_factory=list)
    regenerated: bool = False  # the row's final assistant turn was left out: it is the turn generated


@dataclass
class ChatTurn:
    messages: list[dict]  # the conversation the reply continues (system prompt and history included)
    reply: str
    finish_reason: str  # stop | length


@dataclass
class GenerateResult:
    rows: int = 0
    completion_tokens: int = 0
    generate_s: float = 0.0
    output_file: Optional[Path] = None
    turns: list[ChatTurn] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.generate_s if self.generate_s > 0 else 0.0


def generate(cfg: DictConfig, run_dir: Path, overrides: list[str] | tuple[str, ...] = (),
             stdin: TextIO | None = None) -> GenerateResult:
    """Validate, load, then sample as `cfg.mode` says. Everything that can be checked before the
    model loads (flags, the prompts file's rows, the chat template) is checked first."""
    validate_generate(cfg, overrides)
    device = resolve_device(cfg.device)
    rows = read_prompt_rows(cfg.prompts_file, cfg.max_rows) if cfg.mode == "batch" else []
    checkpoint = checkpoint_dir(cfg)
    tokenizer = load_generate_tokenizer(cfg, checkpoint)
    template, template_label = chat_template_text(cfg.chat_template, tokenizer)
    if template is None and (cfg.mode == "chat" or cfg.system_prompt):
        needs = "mode=chat" if cfg.mode == "chat" else "system_prompt"
        raise ConfigError(f"{needs} needs a chat template, and the tokenizer has none (chat_template=null).\n"
                          "  fix: chat_template=chatml (or llama3, or a Jinja string).")
    prompts = [render_prompt(row, tokenizer, template, cfg.system_prompt) for row in rows]
    model, label = load_model(cfg, checkpoint, tokenizer, device)
    model.eval().requires_grad_(False)
    print(f"[soup] model: {label} | device={device} dtype={cfg.model.dtype} quant={cfg.quant.name} | "
          f"chat template: {template_label}")
    print(f"[soup] sampling: temperature={cfg.temperature} top_p={cfg.top_p} top_k={cfg.top_k} min_p={cfg.min_p} "
          f"repetition_penalty={cfg.repetition_penalty} max_new_tokens={cfg.max_new_tokens} seed={cfg.seed}"
          + (f" | {len(prompts)} prompts of {cfg.prompts_file}, batch_size={cfg.batch_size}"
             if cfg.mode == "batch" else ""))
    if cfg.mode == "batch":
        output = Path(cfg.output_file).expanduser() if cfg.output_file else run_dir / "generations.jsonl"
        return generate_batch(model, tokenizer, prompts, cfg, output)
    return chat(model, tokenizer, template, cfg, stdin if stdin is not None else sys.stdin)


# ---------------------------------------------------------------- the model and its tokenizer

# Heads that score, label or embed text: their final/ cannot sample it (an LM head would load random).
NOT_GENERATIVE = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
ADAPTER_HEADS = {"SEQ_CLS": "sequence-score", "TOKEN_CLS": "token-class", "FEATURE_EXTRACTION": "embedding"}
LM_FIX = "point checkpoint at the final/ of a run with a language-model task (sft, pretrain, dpo, grpo, ...)."


def checkpoint_dir(cfg: DictConfig) -> Optional[Path]:
    """The checked `checkpoint` folder (a causal LM or its adapter), or None for the model group.
    Only config files are read: a wrong folder is refused before anything loads."""
    if cfg.checkpoint is None:
        return None
    folder = Path(cfg.checkpoint).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"checkpoint={cfg.checkpoint}: no such directory (resolved to {folder.resolve()}).\n"
                          "  fix: point checkpoint at a run's final/ directory (outputs/<date>/<time>/final), "
                          "or checkpoint=null to sample from the model group.")
    folder = folder.resolve()
    if is_adapter(folder):
        task_type = json.loads((folder / "adapter_config.json").read_text()).get("task_type")
        if task_type in ADAPTER_HEADS:
            raise ConfigError(f"checkpoint={cfg.checkpoint} is an adapter with a {ADAPTER_HEADS[task_type]} head "
                              f"(task_type {task_type}); generation needs a causal language model.\n  fix: {LM_FIX}")
        return folder
    if not (folder / "config.json").is_file():
        inner = folder / "final"
        fix = (f"checkpoint={inner} (the run's final model)" if inner.is_dir()
               else "point checkpoint at a run's final/ directory, or any save_pretrained model or peft "
                    "adapter folder.")
        raise ConfigError(f"checkpoint={cfg.checkpoint}: {folder} holds neither a model (config.json) nor an "
                          f"adapter (adapter_config.json).\n  fix: {fix}")
    if cfg.model.name == "hf":
        raise ConfigError(f"checkpoint={cfg.checkpoint} is a full model, so model=hf model.path (which names an "
                          "adapter's base) is not read.\n  fix: drop model=hf and model.path.")
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    scoring = [a for a in architectures if a.endswith(NOT_GENERATIVE) or (a.endswith("Model") and
                                                                             not a.endswith("LMHeadModel"))]
    if architectures and len(scoring) == len(architectures):
        raise ConfigError(f"checkpoint={cfg.checkpoint} holds a {architectures[0]}, which scores or embeds text; "
                          f"generation needs a causal language model.\n  fix: {LM_FIX}")
    return folder


def is_adapter(checkpoint: Optional[Path]) -> bool:
    return checkpoint is not None and (checkpoint / "adapter_config.json").is_file()


def load_generate_tokenizer(cfg: DictConfig, checkpoint: Optional[Path]):
    """model.tokenizer_path if given; else the checkpoint's own (soup.train saves it in final/,
    with the chat template the run trained with); else the model group's, as soup.train builds it."""
    if checkpoint is None:
        return build_tokenizer(cfg.model)
    if cfg.model.tokenizer_path:
        source = model_source(cfg.model.tokenizer_path, "model.tokenizer_path", needs_weights=False)
    else:
        source = model_source(str(checkpoint), "checkpoint", needs_weights=False)
    return load_tokenizer(source, cfg.model.trust_remote_code)


def load_model(cfg: DictConfig, checkpoint: Optional[Path], tokenizer, device: torch.device):
    """(model on `device`, a label for the log)."""
    quantized = cfg.quant.name in BNB_QUANTS
    if checkpoint is None:
        if cfg.model.name == "hf":
            label = cfg.model.path
            if quantized:
                return load_quantized(model_source(cfg.model.path, needs_tokenizer=False), cfg.quant, device,
                                      **load_kwargs(cfg.model)), label
        else:
            arch = cfg.model.tiny
            label = (f"model=tiny, random weights from seed={cfg.seed} (hidden {arch.hidden_size}, "
                     f"{arch.num_hidden_layers} layers)")
        model = build_model(cfg.model, tokenizer, cfg.seed)
        if quantized:
            return quantize_built_model(model, cfg.quant, device, **load_kwargs(cfg.model)), label
        return model.to(device), label
    kwargs = {"dtype": DTYPES[cfg.model.dtype], "attn_implementation": cfg.model.attn_implementation,
              "trust_remote_code": cfg.model.trust_remote_code}
    if is_adapter(checkpoint):
        return load_adapter(cfg, checkpoint, device, kwargs)
    source = model_source(str(checkpoint), "checkpoint", needs_tokenizer=False)
    if quantized:
        return load_quantized(source, cfg.quant, device, **kwargs), f"{checkpoint} ({cfg.quant.name})"
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, **kwargs).to(device), str(checkpoint)


def load_adapter(cfg: DictConfig, checkpoint: Path, device: torch.device, kwargs: dict):
    """The adapter on the base soup.merge finds for it (soup/merge.py: load_base). Unquantised,
    it is merged (one matmul per layer at each step, not three) and cast to model.dtype; with
    quant=4bit|8bit the float32 base is quantised and the adapter stays beside it, as QLoRA trained it."""
    from peft import PeftModel

    from soup.merge import load_base

    base = model_source(cfg.model.path, "model.path", needs_tokenizer=False) if cfg.model.name == "hf" else None
    try:
        base_model = load_base(checkpoint, base, cfg.model.trust_remote_code)
    except SoupError as exc:
        found = "\n".join(line for line in str(exc).splitlines() if not line.lstrip().startswith("fix:"))
        raise SoupError(f"checkpoint={cfg.checkpoint}: the adapter's base model cannot be found: {found}\n"
                        "  fix: model=hf model.path=<the base model's folder or hub id>, or point checkpoint at "
                        "final/ inside the run directory that trained it (its .hydra/config.yaml rebuilds the "
                        "base).") from exc
    if cfg.quant.name in BNB_QUANTS:
        model = PeftModel.from_pretrained(quantize_built_model(base_model, cfg.quant, device, **kwargs), checkpoint)
        return model, f"{checkpoint} (adapter on a {cfg.quant.name} base)"
    merged = PeftModel.from_pretrained(base_model, checkpoint).merge_and_unload()
    return merged.to(device=device, dtype=kwargs["dtype"]), f"{checkpoint} (adapter merged into its base)"


def chat_template_text(value: Optional[str], tokenizer) -> tuple[Optional[str], str]:
    """(the Jinja text, a label): `chat_template` is null (the tokenizer's own, or None when it has
    none), a preset of soup.data.templates, or a Jinja string (checked as data.chat_template is)."""
    if value is None:
        own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        return own, ("the tokenizer's own" if own else "none (text prompts are used as written)")
    if value in PRESETS:
        return PRESETS[value], value
    if "{{" in value or "{%" in value:
        return validate_template(value, "chat_template"), "a Jinja string"
    raise ConfigError(f"chat_template={value!r} is neither a preset nor a Jinja template.\n"
                      f"  fix: one of {', '.join(PRESETS)}, null for the tokenizer's own, or a Jinja string.")


def stop_ids_of(model, tokenizer) -> set[int]:
    """EOS and the end-of-turn tokens of the vocabulary, plus the model's generation_config EOS ids."""
    ids = stop_token_ids(tokenizer)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return ids | ({eos} if isinstance(eos, int) else set(eos or ()))


def sampling_params(cfg: DictConfig) -> SamplingParams:
    return SamplingParams(max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty)


def context_limit(model) -> Optional[int]:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def encode_chat(messages: list[dict], tokenizer, template: str) -> list[int]:
    # The template writes the special tokens (a BOS too, where it has one).
    return tokenizer(render_chat(messages, tokenizer, template, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- batch mode

def read_prompt_rows(prompts_file: str, max_rows: Optional[int] = None) -> list[Row]:
    path = resolve_data_path(prompts_file, "prompts_file")
    if not path.is_file():
        raise DataError(f"prompts_file={prompts_file}: file not found", path=str(path),
                        fix="point prompts_file at a .jsonl file (relative paths resolve against the launch "
                            "directory).")
    if not path.read_bytes().strip():
        raise DataError(f"prompts_file={prompts_file}: the file is empty", path=str(path), fix=PROMPT_FIX)
    rows = read_rows(path, max_rows)
    for row in rows:
        prompt_value(row)  # every row's shape, before any model loads
    return rows


def prompt_value(row: Row) -> str | list[dict]:
    """The row's prompt text or message list; a DataError at the row when it has neither (or both)."""
    keys = [key for key in ("prompt", "messages") if key in row.record]
    if not keys:
        raise row_error(row, f"the row has neither `prompt` nor `messages` (its keys: "
                             f"{', '.join(row.record) or 'none'})", fix=PROMPT_FIX)
    if len(keys) == 2:
        raise row_error(row, "the row has both `prompt` and `messages`, so which to continue is ambiguous",
                        fix="keep one of them.")
    value = row.record[keys[0]]
    if isinstance(value, str) and keys[0] == "prompt":
        if not value.strip():
            raise row_error(row, "`prompt` is empty", fix=PROMPT_FIX)
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and "content" in m for m in value):
        if all(m["role"] == "assistant" for m in value):
            raise row_error(row, f"`{keys[0]}` holds only assistant turns, so there is nothing to reply to",
                            fix=PROMPT_FIX)
        return value
    raise row_error(row, f"`{keys[0]}` is {json.dumps(value)[:60]}, not {'text or ' if keys[0] == 'prompt' else ''}"
                         "a non-empty list of {role, content} messages", fix=PROMPT_FIX)


def render_prompt(row: Row, tokenizer, template: Optional[str], system_prompt: Optional[str]) -> Prompt:
    """A row's prompt tokens: text becomes a user turn and a conversation is taken as it is (its
    final assistant turn, if any, left out: that is the turn generated), then the chat template
    renders it with its generation prompt; system_prompt leads unless the row has its own. Without
    a template a text prompt is used as written, as a base model's prompt is."""
    value = prompt_value(row)
    if isinstance(value, list):
        regenerated = value[-1]["role"] == "assistant"
        messages = value[:-1] if regenerated else list(value)
        shown = messages
    else:
        messages, shown, regenerated = [{"role": "user", "content": value}], value, False
    if template is None:
        if isinstance(value, list):
            raise row_error(row, "the row is a conversation, and the tokenizer has no chat template to render it",
                            fix="chat_template=chatml (or llama3, or a Jinja string).")
        return Prompt(row, shown, tokenizer(value)["input_ids"], regenerated)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    try:
        return Prompt(row, shown, encode_chat(messages, tokenizer, template), regenerated)
    except jinja2.TemplateError as exc:
        raise row_error(row, f"the chat template refused this conversation: {exc}",
                        fix="fix the row's roles/order, or choose another chat_template.") from exc


def generate_batch(model, tokenizer, prompts: list[Prompt], cfg: DictConfig, output: Path) -> GenerateResult:
    """Sample every prompt, batch_size at a time in file order, and write one row each to `output`."""
    check_context(prompts, model, cfg.max_new_tokens)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    existed = output.exists()
    result = GenerateResult(output_file=output)
    finish_counts = {"stop": 0, "length": 0}
    started = time.perf_counter()
    with open(output, "w", encoding="utf-8") as out:
        for batch in sample_prompts(model, tokenizer, prompts, sampling_params(cfg), cfg.batch_size, generator):
            for prompt, done in zip(batch.prompts, batch.completions):
                finish_counts[done.finish_reason] += 1
                result.completion_tokens += done.tokens
                out.write(json.dumps({"prompt": prompt.shown, "completion": done.text,
                                      "finish_reason": done.finish_reason, "tokens": done.tokens},
                                     ensure_ascii=False) + "\n")
            out.flush()  # a stopped run keeps its finished batches
    result.generate_s = time.perf_counter() - started
    result.rows = len(prompts)
    regenerated = sum(p.regenerated for p in prompts)
    print(f"[soup] generated {result.rows} rows ({finish_counts['stop']} stopped, {finish_counts['length']} at "
          f"max_new_tokens{f', {regenerated} final assistant turns generated anew' if regenerated else ''}): "
          f"{result.completion_tokens} tokens in {result.generate_s:.2f} s, {result.tokens_per_s:.1f} tokens/s "
          f"-> {output}{' (overwritten)' if existed else ''}")
    return result


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length
    tokens: int


@dataclass
class SampledBatch:
    prompts: list[Prompt]
    completions: list[Completion]


def check_context(prompts: list[Prompt], model, max_new_tokens: int) -> None:
    """A row error for the first prompt that, with max_new_tokens, passes the model's positions."""
    limit = context_limit(model)
    for prompt in prompts:
        if limit and len(prompt.ids) + max_new_tokens > limit:
            raise row_error(prompt.row, f"the prompt is {len(prompt.ids)} tokens, and with max_new_tokens="
                                        f"{max_new_tokens} it passes the model's {limit} positions",
                            fix=f"lower max_new_tokens to {max(limit - len(prompt.ids), 0)} or less, or shorten "
                                "the prompt.")


def sample_prompts(model, tokenizer, prompts: list[Prompt], params: SamplingParams, batch_size: int,
                   generator: torch.Generator) -> Iterator[SampledBatch]:
    """The rollout engine over `prompts`, batch_size at a time in order: each batch's decoded completions."""
    stops = stop_ids_of(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        rollout = sample(model, [p.ids for p in batch], params, pad_id=pad_id, stop_ids=stops, generator=generator)
        completions = [Completion(decode_after(tokenizer, prompt.ids[-CONTEXT_TOKENS:], ids[:length]),
                                  "length" if truncated else "stop", length)
                       for prompt, ids, length, truncated in zip(batch, rollout.completion_ids.tolist(),
                                                                 rollout.lengths.tolist(), rollout.truncated.tolist())]
        yield SampledBatch(batch, completions)


# ---------------------------------------------------------------- chat mode

@torch.no_grad()
def stream_tokens(model, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int],
                  generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield one completion's tokens as they are drawn, the stop token last if one comes.

    The engine's decode step for a single unpadded sequence (soup/rollout/engine.py: the same
    forward arguments, logits processors and draw), so with the same generator state it samples
    what `sample` samples for this prompt alone."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    attention = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache_key = "cache" if "cache" in out else "past_key_values"  # transformers 5.24 renamed it
    seen = None
    for step in range(params.max_completion_length):
        logits = out.logits[:, -1, :].float()
        if seen is None and params.repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, ids[0].clamp(max=logits.shape[-1] - 1)] = True
        processed = process_logits(logits, seen, params)
        if params.temperature > 0:
            chosen = torch.multinomial(processed.log_softmax(-1).exp(), 1, generator=generator)
        else:
            chosen = processed.argmax(-1, keepdim=True)
        token = int(chosen)
        yield token
        if token in stop_ids or step == params.max_completion_length - 1:
            return
        if seen is not None:
            seen[0, token] = True
        attention = torch.cat([attention, torch.ones_like(chosen)], dim=1)
        out = model(input_ids=chosen, attention_mask=attention, position_ids=positions[:, -1:] + 1 + step,
                    use_cache=True, **{cache_key: out[cache_key]})


# Prompt tokens a completion is decoded after: SentencePiece drops the space of a text's first
# word ("▁and" alone decodes as "and"), so a completion decoded on its own would lose the space
# that joins it to its prompt. A few tokens of context keep it (as vLLM's detokenizer does).
CONTEXT_TOKENS = 4


def decode_after(tokenizer, context_ids: list[int], ids: list[int]) -> str:
    """The text `ids` add after `context_ids` (special tokens skipped)."""
    before = tokenizer.decode(context_ids, skip_special_tokens=True)
    text = tokenizer.decode([*context_ids, *ids], skip_special_tokens=True)
    return text[len(before):] if text.startswith(before) else tokenizer.decode(ids, skip_special_tokens=True)


class TextDelta:
    """The text a growing completion adds at each token, decoded after its prompt (decode_after).
    A byte-level token can end inside a multi-byte character, which decodes as U+FFFD until its
    last byte comes: that tail is held back."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer, self.context, self.ids, self.shown = tokenizer, prompt_ids[-CONTEXT_TOKENS:], [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = decode_after(self.tokenizer, self.context, self.ids)
        return "" if text.endswith("\ufffd") else self._new(text)

    def finish(self) -> str:
        return self._new(decode_after(self.tokenizer, self.context, self.ids))

    def _new(self, text: str) -> str:
        new, self.shown = text[self.shown:], len(text)
        return new


CHAT_HELP = "/reset clears the history, /exit (or end of input) ends"


def chat(model, tokenizer, template: str, cfg: DictConfig, stdin: TextIO) -> GenerateResult:
    """Read a user message per line of `stdin`, stream the reply to stdout, keep the history."""
    params = sampling_params(cfg)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stops = stop_ids_of(model, tokenizer)
    limit = context_limit(model)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    history: list[dict] = []
    result = GenerateResult()
    interactive = stdin.isatty()
    print(f"[soup] chat: one message per line; {CHAT_HELP}"
          + (f". system prompt: {cfg.system_prompt!r}" if cfg.system_prompt else ""), flush=True)
    try:
        while True:
            if interactive:
                print(">>> ", end="", flush=True)
            line = stdin.readline()
            if not line:
                break
            text = line.rstrip("\r\n")
            command = text.strip()
            if not command:
                continue
            if command == "/exit":
                break
            if command == "/reset":
                history.clear()
                print("[soup] history cleared", flush=True)
                continue
            if command.startswith("/") and " " not in command:
                print(f"[soup] unknown command {command}: {CHAT_HELP}", flush=True)
                continue
            messages = [*system, *history, {"role": "user", "content": text}]
            try:
                ids = encode_chat(messages, tokenizer, template)
            except jinja2.TemplateError as exc:
                raise ConfigError(f"the chat template refused the conversation: {exc}\n  fix: another chat_template "
                                  f"(chatml, llama3){', or no system_prompt' if system else ''}.") from exc
            if limit and len(ids) + cfg.max_new_tokens > limit:
                print(f"[soup] the conversation is {len(ids)} tokens, and with max_new_tokens={cfg.max_new_tokens} "
                      f"it passes the model's {limit} positions: /reset to start over, or lower max_new_tokens.",
                      flush=True)
                continue
            delta, tokens = TextDelta(tokenizer, ids), []
            started = time.perf_counter()
            for token in stream_tokens(model, ids, params, stops, generator):
                tokens.append(token)
                piece = delta.push(token)
                if piece:
                    print(piece, end="", flush=True)
            print(delta.finish(), flush=True)
            result.generate_s += time.perf_counter() - started
            result.completion_tokens += len(tokens)
            reply = decode_after(tokenizer, ids[-CONTEXT_TOKENS:], tokens)
            finish = "stop" if tokens[-1] in stops else "length"
            if finish == "length":
                print(f"[soup] (the reply reached max_new_tokens={cfg.max_new_tokens})", flush=True)
            result.turns.append(ChatTurn(messages, reply, finish))
            history += [messages[-1], {"role": "assistant", "content": reply}]
    except KeyboardInterrupt:
        print()  # Ctrl-C ends the chat as end of input does
    result.rows = len(result.turns)
    print(f"[soup] chat ended: {result.rows} replies, {result.completion_tokens} tokens, "
          f"{result.tokens_per_s:.1f} tokens/s", flush=True)
    return result


# ---------------------------------------------------------------- the command line

@hydra.main(version_base=None, config_path=CONF_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    hydra_job(lambda run_dir, overrides: generate(cfg, run_dir, overrides), USER_ERROR)


def cli() -> None:
    """`python -m soup.generate`, with Hydra's user errors exiting USER_ERROR (soup/console.py)."""
    hydra_cli(main, USER_ERROR)


if __name__ == "__main__":
    cli()
