"""Model folders, checked before transformers reads them.

transformers reports a wrong path as a hub error ("Repo id must be in the form ..."),
a folder without a model as a tokenizer-library error (sentencepiece, tiktoken) and a
damaged weights file as a raw SafetensorError. soup looks first and names the folder,
what it expected there and the fix.

A local folder is passed on as an absolute path, so what the model records as its
origin (an adapter's base_model_name_or_path) still points at it from another folder.
A value that is not an existing path but reads as a hub id (`owner/name`) goes to
transformers as it is: the hub, or its local cache when offline.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from soup.errors import ConfigError

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EXAMPLE = "../shared/models/stories260k"


def model_source(path: str, flag: str = "model.path", *, needs_weights: bool = True,
                 needs_tokenizer: bool = True) -> str:
    """`path` as from_pretrained should receive it: an absolute local folder, checked, or a hub id.

    Raises ConfigError naming `flag` when the folder does not exist, lacks the files a
    model (`needs_weights`) or tokenizer (`needs_tokenizer`) needs, or holds a damaged
    safetensors file."""
    folder = Path(path).expanduser()
    if not folder.exists():
        if _HUB_ID.match(path) and not path.startswith("."):
            return path
        raise ConfigError(f"{flag}={path}: no such directory (resolved to {folder.resolve()}).\n"
                          f"  fix: point {flag} at a folder holding config.json, the weights and the tokenizer "
                          f"(a save_pretrained output, e.g. {EXAMPLE}).")
    if not folder.is_dir():
        raise ConfigError(f"{flag}={path}: {folder.resolve()} is a file; a model is a folder.\n"
                          f"  fix: point {flag} at the folder that holds it.")
    folder = folder.resolve()
    missing = []
    if needs_weights and not (folder / "config.json").is_file():
        missing.append("config.json")
    if needs_weights and not _weight_files(folder):
        missing.append("weights (" + ", ".join(WEIGHTS) + ", or model-*-of-*.safetensors)")
    if needs_tokenizer and not _has_tokenizer(folder):
        missing.append("tokenizer files (" + ", ".join(TOKENIZER_FILES) + ", or *.tiktoken)")
    if missing:
        held = sorted(p.name for p in folder.iterdir())
        only_tokenizer = len(missing) == 1 and missing[0].startswith("tokenizer")
        raise ConfigError(f"{flag}={path}: {folder} holds no model: it lacks {'; '.join(missing)}. "
                          f"It holds: {', '.join(held[:12]) or 'nothing'}{' ...' if len(held) > 12 else ''}.\n"
                          f"  fix: point {flag} at a save_pretrained output (e.g. {EXAMPLE})"
                          + (", or set model.tokenizer_path to a tokenizer folder." if only_tokenizer else "."))
    if needs_weights:
        for file in sorted(folder.glob("*.safetensors")):
            problem = safetensors_problem(file)
            if problem:
                raise ConfigError(f"{flag}={path}: {file} is corrupt ({problem}).\n"
                                  "  fix: copy or save the model again (save_pretrained), or download it again.")
    return str(folder)


def _weight_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHTS) or any(folder.glob("*.safetensors"))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None: its 8-byte header length,
    JSON header and the tensors' byte ranges must fit the file exactly."""
    size = file.stat().st_size
    if size < 8:
        return f"{size} bytes, too short to be a safetensors file"
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return "not a safetensors file, or truncated inside its header"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not a safetensors file: its header is not JSON"
    if not isinstance(header, dict):
        return "not a safetensors file: its header is not a table of tensors"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} bytes, its header describes {expected}"
    return None
