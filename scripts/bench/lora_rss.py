"""Why LoRA's peak RSS is above a full fine-tune's on CPU: saved activations vs allocator.

    python scripts/bench/lora_rss.py            # ~1 min on 2 cores; writes .bench/lora_rss.json

peft_variants.py shows every adapter peaking above the full fine-tune of the ~4.7M model.
This script separates the two candidate causes, each variant (full, lora) in a fresh
process on peft_variants.py's model shape (random init, 8 x 512 random tokens, full
logits and loss, fused AdamW, 3 steps):

    saved_mb        unique non-parameter storages the forward saves for backward, counted
                    with torch.autograd.graph.saved_tensors_hooks: what the adapters
                    really keep
    growth_mb       peak RSS minus RSS before the first step, with glibc's default malloc
    growth_mmap_mb  the same with MALLOC_MMAP_THRESHOLD_=65536, so blocks of 64 KiB and more
                    are mmap-ed and given back to the OS when freed: what remains is
                    memory held at once, not the allocator's retained high-water mark
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")


def child(variant: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    if variant == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    ids = torch.randint(SHAPE["vocab_size"], (8, 512), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            saved.setdefault(ptr, tensor.untyped_storage().nbytes())
        return tensor

    before = rss_mb()
    for step in range(3):
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if step == 0 else None
        if hooks:
            with hooks:
                out = model(input_ids=ids, labels=ids, use_cache=False)
        else:
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"saved_mb": sum(saved.values()) / 2**20, "rss_before_mb": before, "peak_rss_mb": peak,
            "growth_mb": peak - before,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run(variant: str, mmap: bool) -> dict:
    env = dict(os.environ)
    if mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, __file__, "--child", variant], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "lora_rss.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    rows = {}
    for variant in ("full", "lora"):
        plain, mmap = run(variant, mmap=False), run(variant, mmap=True)
        rows[variant] = {**plain, "growth_mmap_mb": mmap["growth_mb"], "peak_rss_mmap_mb": mmap["peak_rss_mb"]}
        r = rows[variant]
        print(f"{variant:<5} saved for backward {r['saved_mb']:6.0f} MB | RSS growth {r['growth_mb']:5.0f} MB "
              f"(default malloc), {r['growth_mmap_mb']:5.0f} MB (MALLOC_MMAP_THRESHOLD_=65536)")
    from soup.precision import cpu_record

    machine = {"cpu_count": os.cpu_count(), **cpu_record()}
    print(f"machine: {machine['cpu_count']} CPUs, torch CPU capability {machine['cpu_capability']}, "
          f"native bf16 {'yes' if machine['cpu_native_bf16'] else 'no'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "lora_rss_cpu", "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "machine": machine, "shape": SHAPE, "lora": LORA, "tokens": [8, 512],
                                    "steps": 3, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
