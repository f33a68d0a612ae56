"""Export a merged Llama model to one llama.cpp GGUF file, with a model card beside it.

    python -m soup.export --model merged/ --out merged/model.gguf                 # f16
    python -m soup.export --model outputs/<run>/final --out model.gguf --type q8_0

--model is a plain transformers Llama-architecture model directory (a full fine-tune's final/,
or what `python -m soup.merge` wrote) with its tokenizer. The file carries llama.cpp's `llama`
architecture metadata, its tensor names, q/k rows permuted to llama.cpp's interleaved RoPE, and
the tokenizer (tokens, scores, types, merges, special ids, chat template), so llama.cpp runs it
and `transformers` loads it back (`from_pretrained(dir, gguf_file=name)`; a test compares logits).
Types: f32, f16 (1-D tensors stay f32, as llama.cpp's converter keeps them) and q8_0 (a 2-D tensor
whose rows are not a multiple of 32 values stays f16, as llama.cpp's converter does).

The model card (README.md beside the file; --no-card skips it) is rendered from the soup run the
model came from: --run, else the run whose final/ --model is, else the run a soup card in --model
names (soup/model_card.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from soup.errors import SoupError, require

# --type -> llama.cpp's name for the file type (gguf.LlamaFileType)
TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}

# transformers Llama tensor names -> llama.cpp's (gguf-py's MODEL_TENSOR names for MODEL_ARCH.LLAMA)
TOP_LEVEL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


@dataclass
class ExportResult:
    path: Path
    type_name: str
    kept_f16: list[str] = field(default_factory=list)  # q8_0: tensors whose rows do not split into blocks
    card: Path | None = None
    size_bytes: int = 0


def export(model_dir: Path, out_file: Path, type_name: str = "f16", run_dir: Path | None = None,
           card: bool = True) -> ExportResult:
    """Write `out_file` (GGUF) from the Llama model in `model_dir`, and its model card beside it."""
    gguf = require("gguf", extra="export", wanted_by="python -m soup.export")
    from transformers import AutoModelForCausalLM

    model_dir, out_file = Path(model_dir), Path(out_file)
    if type_name not in TYPES:
        raise SoupError(f"--type {type_name}: soup.export writes {', '.join(TYPES)}.\n"
                        "  fix: pick one of those; for k-quants (q4_k_m, ...) quantise the f16 file with "
                        "llama.cpp's llama-quantize.")
    if out_file.suffix != ".gguf":
        raise SoupError(f"--out {out_file}: the file name must end in .gguf (llama.cpp and transformers look for it).\n"
                        f"  fix: --out {out_file.with_suffix('.gguf')}")
    config = checked_llama_config(model_dir)
    run_dir = _card_run(model_dir, run_dir) if card else None
    if run_dir is not None:  # refused before any work, not after the file is written
        from soup.model_card import checked_card_path

        checked_card_path(out_file.parent)
    tokenizer = _load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    writer = _writer(tmp)
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, TYPES[type_name])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_llama_metadata(writer, config)
    add_tokenizer_metadata(writer, tokenizer, config.vocab_size)
    result = ExportResult(out_file, type_name)
    for name, weight in llama_cpp_tensors(model.state_dict(), config):
        if add_tensor(writer, name, weight, type_name) != type_name and weight.ndim == 2:
            result.kept_f16.append(name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_file)  # a killed export leaves no half-written .gguf under the name asked for
    result.size_bytes = out_file.stat().st_size

    if run_dir is not None:
        from soup.model_card import write_card

        result.card = write_card(run_dir, out_file.parent, exported=f"{out_file.name} ({type_name})")
    return result


def _writer(path: Path):
    """A GGUFWriter for `path` that also writes empty arrays.

    The GGUF format allows an array of length 0 and llama.cpp reads one, but gguf-py's writer
    refuses it; a byte-level tokenizer with no merges (soup's byte tokenizer) needs an empty
    tokenizer.ggml.merges, since llama.cpp refuses a `gpt2` vocabulary without the key."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                type_prefix = self._pack("I", vtype) if add_vtype else b""
                return type_prefix + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer(path, "llama")


def checked_llama_config(model_dir: Path):
    """The model's config, or a SoupError saying why this directory cannot be exported."""
    from transformers import AutoConfig

    if (model_dir / "adapter_config.json").exists():
        raise SoupError(f"--model {model_dir}: this is a peft adapter, not a full model.\n"
                        f"  fix: merge it first: python -m soup.merge --adapter {model_dir} --out merged/ ; "
                        "then --model merged/")
    if not (model_dir / "config.json").is_file():
        raise SoupError(f"--model {model_dir}: no config.json there, so it is not a transformers model directory.\n"
                        "  fix: point --model at a merged model (python -m soup.merge) or a full fine-tune's final/.")
    config = AutoConfig.from_pretrained(model_dir)
    architectures = config.architectures or ["LlamaForCausalLM"]
    if config.model_type != "llama":
        raise SoupError(f"--model {model_dir}: the architecture is {config.model_type} ({', '.join(architectures)}); "
                        "soup.export writes llama.cpp's llama architecture only.\n"
                        "  fix: convert it with llama.cpp's convert_hf_to_gguf.py, which knows many more "
                        "architectures, or export a Llama-architecture model.")
    if "LlamaForCausalLM" not in architectures:
        raise SoupError(f"--model {model_dir}: {', '.join(architectures)} is a Llama with another head; "
                        "llama.cpp's llama architecture is a causal LM (next-token logits).\n"
                        "  fix: export a causal-LM model (task sft, pretrain, dpo, ...), not a reward model "
                        "or classifier.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    unsupported = []
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_type {rope['rope_type']} (rope scaling)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        unsupported.append("attention/MLP biases")
    if unsupported:
        raise SoupError(f"--model {model_dir}: this Llama uses {', '.join(unsupported)}, "
                        "which soup.export does not write.\n"
                        "  fix: convert it with llama.cpp's convert_hf_to_gguf.py.")
    return config


def add_llama_metadata(writer, config) -> None:
    """llama.cpp's `llama.*` keys, the ones transformers' GGUF loader reads back into a LlamaConfig."""
    rope = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:  # llama.cpp derives it otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k projection rows from transformers' rotate-half RoPE layout to llama.cpp's interleaved one.

    transformers rotates dimension pairs (i, i + head_dim/2) of each head; llama.cpp's llama
    architecture rotates (2i, 2i + 1). Per head, rows [0..d/2) and [d/2..d) are interleaved, as
    llama.cpp's convert_hf_to_gguf.py LlamaModel.permute does and transformers' GGUF loader
    (LlamaTensorProcessor._reverse_permute_weights) undoes. weight: [n_head * head_dim, hidden].
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_cpp_tensors(state_dict: dict[str, torch.Tensor], config):
    """(llama.cpp name, float32 tensor) for every weight; none named `output` when the head is tied
    to the embedding (llama.cpp and transformers read a missing output.weight as tied)."""
    n_head, n_kv_head = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for hf_name, weight in state_dict.items():
        stem, _, suffix = hf_name.rpartition(".")
        if stem == "lm_head" and config.tie_word_embeddings:
            continue
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
        if layer and layer[2] in LAYER_NAMES:
            name = f"blk.{layer[1]}.{LAYER_NAMES[layer[2]]}"
        else:
            name = TOP_LEVEL_NAMES.get(stem)
        if name is None:
            raise SoupError(f"the model has a tensor {hf_name} that llama.cpp's llama architecture has no place for.\n"
                            "  fix: convert it with llama.cpp's convert_hf_to_gguf.py.")
        weight = weight.detach().float()
        if name.endswith("attn_q"):
            weight = permute_for_llama_cpp(weight, n_head)
        elif name.endswith("attn_k"):
            weight = permute_for_llama_cpp(weight, n_kv_head)
        yield f"{name}.{suffix}", weight


def add_tensor(writer, name: str, weight: torch.Tensor, type_name: str) -> str:
    """Add `weight` in the requested type; returns the type written ("f32" for 1-D tensors, as
    llama.cpp's converter keeps norms; "f16" for a q8_0 tensor whose rows are not whole blocks)."""
    import gguf

    array = weight.contiguous().numpy()
    if array.ndim == 1 or type_name == "f32":
        writer.add_tensor(name, array.astype(np.float32))
        return "f32"
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    if type_name == "f16" or array.shape[-1] % block:
        writer.add_tensor(name, array.astype(np.float16))
        return "f16"
    writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    return "q8_0"


# --------------------------------------------------------------------------- tokenizer


def add_tokenizer_metadata(writer, tokenizer, n_vocab: int) -> None:
    """llama.cpp's `tokenizer.ggml.*` keys and the chat template.

    Two tokenizer families, told apart by tokenizer.json's model:
    - `llama`: sentencepiece-style BPE with byte fallback (`<0x0A>` tokens, `▁` for spaces):
      Llama 1/2, Mistral, TinyLlama, stories260k. llama.cpp merges by score, so each token's
      score is minus the rank of the first merge that makes it (the order sentencepiece gave them).
    - `gpt2`: byte-level BPE (Llama 3, SmolLM, soup's byte tokenizer); llama.cpp merges by the
      merges list.
    Both carry the merges, which transformers' GGUF tokenizer uses as they are. A model whose
    embedding has more rows than the tokenizer has tokens gets `[PADn]` tokens of type UNUSED
    up to its size, as llama.cpp's converter pads.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise SoupError(f"the tokenizer is a {model.get('type')} model; soup.export writes BPE tokenizers "
                        "(sentencepiece-style with byte fallback, or byte-level) only.\n"
                        "  fix: convert this model with llama.cpp's convert_hf_to_gguf.py.")
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if not model.get("byte_fallback") and not byte_level:
        raise SoupError("the tokenizer is BPE without byte fallback or byte-level pre-tokenization, which neither "
                        "of llama.cpp's BPE tokenizers reproduces.\n"
                        "  fix: convert it with llama.cpp's convert_hf_to_gguf.py.")
    tokens: list[str | None] = [None] * n_vocab
    for token, index in tokenizer.get_vocab().items():
        if index >= n_vocab:
            raise SoupError(f"the tokenizer has token {token!r} at id {index}, past the model's {n_vocab} "
                            "embedding rows.\n  fix: resize the model's embeddings to the tokenizer "
                            "(model.resize_token_embeddings(len(tokenizer))) and save it again.")
        tokens[index] = token
    pairs = [tuple(pair.split(" ", 1)) if isinstance(pair, str) else tuple(pair) for pair in model.get("merges", [])]
    # GGUF stores a merge as "left right"; a space inside a piece is written as U+0120, as gguf-py's SpecialVocab does
    merges = [" ".join(piece.replace(" ", "\u0120") for piece in pair) for pair in pairs]
    first_merge: dict[str, int] = {}
    for rank, (left, right) in enumerate(pairs):
        first_merge.setdefault(left + right, rank)

    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    unk_id = tokenizer.unk_token_id
    types, scores = [], []
    T = gguf.TokenType
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index], kind = f"[PAD{index}]", T.UNUSED
        elif index == unk_id and not byte_level:
            kind = T.UNKNOWN
        elif index in special:
            kind = T.CONTROL
        elif index in added:
            kind = T.USER_DEFINED
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind = T.BYTE
        else:
            kind = T.NORMAL
        types.append(int(kind))
        if kind != T.NORMAL:
            scores.append(0.0)
        else:  # a token no merge makes (a single character) ranks below every merged one
            scores.append(-float(first_merge.get(token, len(merges) + index)))

    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    if byte_level:
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec, merges))
    else:
        metaspace = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("normalizer"))
        writer.add_add_space_prefix('"prepend_scheme": "never"' not in metaspace)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # An empty list too (soup's byte tokenizer): llama.cpp refuses a vocabulary with no merges key.
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    add_bos, add_eos = _adds_special_tokens(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(spec: dict, merges: list[str]) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text before merging.

    GPT-2's own regex is `gpt-2`; without merges every byte is its own token and any split gives
    the same ids. Others get llama.cpp's `default`, with a warning: llama.cpp names pre-tokenizers
    by a hash of their outputs (convert_hf_to_gguf.py get_vocab_base_pre), which this does not repeat."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if merges:
        print("[soup] warning: the tokenizer's pre-tokenizer is not GPT-2's; the file says `default`, so "
              "llama.cpp may split some text (digits, punctuation) differently from transformers", file=sys.stderr)
    return "default"


def _adds_special_tokens(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what the tokenizer puts around a text when asked for special tokens."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    added = len(with_special) > len(plain)
    return (added and bos is not None and with_special[0] == bos,
            added and eos is not None and with_special[-1] == eos)


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise SoupError(f"--model {model_dir}: no tokenizer could be loaded there ({exc}).\n"
                        "  fix: save the base model's tokenizer into that folder "
                        "(AutoTokenizer.from_pretrained(base).save_pretrained(folder)).") from exc
    if not tokenizer.is_fast:
        raise SoupError(f"--model {model_dir}: the tokenizer has no tokenizer.json (a slow tokenizer), "
                        "which soup.export reads.\n  fix: save it as a fast tokenizer: "
                        "AutoTokenizer.from_pretrained(folder).save_pretrained(folder).")
    return tokenizer


def _card_run(model_dir: Path, run_dir: Path | None) -> Path | None:
    """The run the card describes: --run (a run dir or its final/), else the one --model came from."""
    from soup.model_card import find_run_dir

    if run_dir is None:
        found = find_run_dir(model_dir)
        if found is None:
            print(f"[soup] no model card: {model_dir} is not a soup run's final/ and names no run; "
                  "pass --run <run dir> to write one", file=sys.stderr)
        return found
    run_dir = Path(run_dir)
    found = find_run_dir(run_dir)
    if found is None:
        raise SoupError(f"--run {run_dir}: no run.json there or in its parent, so it is not a soup run directory.\n"
                        "  fix: pass the run directory (the folder holding run.json and final/), or --no-card.")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soup.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="merged / full model directory (Llama architecture)")
    parser.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    parser.add_argument("--type", default="f16", help=f"tensor type: {', '.join(TYPES)} (default f16)")
    parser.add_argument("--run", default=None, type=Path,
                        help="the soup run for the model card (default: found from --model)")
    parser.add_argument("--card", action=argparse.BooleanOptionalAction, default=True,
                        help="write README.md (the model card) beside the file (default: on)")
    args = parser.parse_args(argv)
    try:
        result = export(args.model, args.out, args.type, args.run, args.card)
    except SoupError as exc:
        print(f"[soup] error: {exc}", file=sys.stderr)
        return 2
    kept = f"; {len(result.kept_f16)} tensors kept f16 (rows not whole q8_0 blocks)" if result.kept_f16 else ""
    size_mib = result.size_bytes / 2**20
    print(f"[soup] exported {args.model} to {result.path} ({result.type_name}, {size_mib:.2f} MiB{kept})")
    if result.card is not None:
        print(f"[soup] model card: {result.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
