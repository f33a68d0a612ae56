"""Tokenizers: the built-in byte-level tokenizer and loading one from disk.

The tiny model needs a tokenizer that exists without any download. A byte-level
vocabulary (256 bytes + a few special tokens, no merges) covers every UTF-8 string,
is identical on every machine, and saves with save_pretrained like any other.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from soup.data.templates import CHATML
from soup.errors import ConfigError

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ChatML special tokens and a ChatML chat template.

    Ids: 0 <pad>, 1 <s>, 2 </s>, 3 <|im_start|>, 4 <|im_end|>, then the 256 bytes.
    """
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1_000_000,
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def _byte_of(ch: str) -> int:
    # GPT-2's byte<->unicode table: printable bytes map to themselves, the rest to 256+.
    code = ord(ch)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory; give it a pad token if it has none (eos, else unk)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.path / model.tokenizer_path: could not load a tokenizer from {path!r}: {exc}\n"
            "  fix: point model.path (or model.tokenizer_path) at a directory with tokenizer files."
        ) from exc
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Padding positions are always masked out of the loss, so any existing token serves."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
