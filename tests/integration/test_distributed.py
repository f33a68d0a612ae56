"""parallelism=ddp, fsdp2 and DeepSpeed ZeRO-2/3 for real: torchrun starts 2 processes that
join a gloo process group on this CPU. A run of 2 ranks x micro_batch_size 4 sees, each step, the same 8 examples as one
process with micro_batch_size 8 (the sampler gives rank r the r-th slice of each step), and
its gradient is the gradient of their token mean (units summed over ranks before the
backward, DDP's average undone by x world size). So the two runs agree up to the order
of floating-point sums: the all-reduce adds two partial gradients where one process adds
per-token terms in one pass, about 1e-7 relative per step in fp32, compounded by Adam over
the steps; 1e-4 relative on the losses and 1e-4 absolute on the weights hold with a wide
margin (observed: below 1e-6)."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, run_in_process

pytestmark = pytest.mark.slow
BASE = ["debug=tiny", "train.max_steps=6", "train.grad_accum_steps=1", "train.eval_every_steps=0",
        "train.progress_bar=false"]


PARALLELISMS = ["ddp", "fsdp2"]
ZERO = [pytest.param(name, id=name, marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                             reason="DeepSpeed is not installed (the deepspeed extra)"))
        for name in ("deepspeed_zero2", "deepspeed_zero3")]


def ranked(task: str, parallelism) -> "pytest.ParameterSet":
    """(task overrides, parallelism) named task-parallelism, with the parallelism's skip mark."""
    if isinstance(parallelism, str):
        return pytest.param([f"task={task}"], parallelism, id=f"{task}-{parallelism}")
    return pytest.param([f"task={task}"], *parallelism.values, id=f"{task}-{parallelism.id}", marks=parallelism.marks)


def torchrun(run_dir: Path, *overrides: str, parallelism: str = "ddp", check: bool = True):
    return run_cli("--standalone", "--nproc_per_node=2", "-m", "soup.train", f"parallelism={parallelism}",
                   *overrides, f"hydra.run.dir={run_dir}", module="torch.distributed.run", check=check, timeout=600)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("task, parallelism", [ranked(task, p) for task in ("sft", "dpo") for p in PARALLELISMS]
                         + [ranked("sft", p) for p in ZERO])
def test_two_ranks_train_like_one_process_with_the_global_batch(tmp_path, task, parallelism):
    torchrun(tmp_path / "ddp", *BASE, *task, "train.micro_batch_size=4", parallelism=parallelism)
    run_in_process(tmp_path / "single", [*BASE, *task, "train.micro_batch_size=8"])
    ddp, single = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert len(ddp) == 6 and ddp == pytest.approx(single, rel=1e-4)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final")  # final/ is one plain model directory
    log = (tmp_path / "ddp" / "train.log").read_text()
    assert log.count(f"[soup] parallelism: {parallelism}, 2 ranks (gloo)") == 1  # rank 0 alone writes


@pytest.mark.parametrize("parallelism", [*PARALLELISMS, ZERO[1]])
def test_a_run_of_ranks_resumes_exactly_at_the_same_world_size(tmp_path, parallelism):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(straight, *BASE, "train.micro_batch_size=4", "train.save_every_steps=3", "train.neftune_alpha=5",
             parallelism=parallelism)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "final")
    (resumed / "run.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "step-6")
    torchrun(resumed, *BASE, "train.micro_batch_size=4", "train.save_every_steps=3", "train.neftune_alpha=5",
             "resume=auto", parallelism=parallelism)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(resumed) == train_losses(straight)
    written = {p.relative_to(straight / "checkpoints" / "step-3").as_posix()
               for p in (straight / "checkpoints" / "step-3").rglob("*")}
    if parallelism == "fsdp2":  # each rank wrote its own shards
        assert written >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    if parallelism == "deepspeed_zero3":
        assert written >= {f"zero/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}


@pytest.mark.parametrize("parallelism", [*PARALLELISMS, ZERO[0]])
def test_lora_trains_across_ranks(tmp_path, parallelism):
    torchrun(tmp_path / "lora", *BASE, "peft=lora", "train.micro_batch_size=4", parallelism=parallelism)
    run_in_process(tmp_path / "single", [*BASE, "peft=lora", "train.micro_batch_size=8"])
    assert train_losses(tmp_path / "lora") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-4)
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").exists()


def test_ddp_without_torchrun_prints_the_torchrun_command(tmp_path):
    proc = run_cli("parallelism=ddp", "debug=tiny", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "torchrun --nproc_per_node 2 -m soup.train parallelism=ddp" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torchrun_with_one_process_parallelism_is_refused(tmp_path):
    proc = run_cli("--standalone", "--nproc_per_node=2", "-m", "soup.train", "debug=tiny",
                   f"hydra.run.dir={tmp_path}", module="torch.distributed.run", check=False)
    assert proc.returncode != 0 and "parallelism=single trains in one" in proc.stderr


def test_grpo_samples_on_every_rank(tmp_path):
    """Each rank rolls out its own prompts (seeded by step and rank); the step reads both ranks' share."""
    (tmp_path / "len.py").write_text("def reward_fn(completions, **columns):\n"
                                     "    return [len(c) / 10 for c in completions]\n")
    torchrun(tmp_path / "run", "task=grpo", "debug=tiny", f"task.reward=[{tmp_path / 'len.py'}]",
             "task.num_generations=4", "task.max_completion_length=8", "train.micro_batch_size=2", "train.max_steps=2",
             "task.beta=0.1", "train.eval_every_steps=0")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    # 58 prompts (6 held out) make ceil(58 / (2 ranks x 2)) = 15 micro-steps per epoch; 2 of them done
    assert len(train) == 2 and train[-1]["epoch"] == pytest.approx(2 / 15)
    assert train[-1]["trained_tokens"] > 0


def test_fsdp2_keeping_blocks_gathered_after_the_forward_trains_the_same(tmp_path):
    torchrun(tmp_path / "kept", *BASE, "train.micro_batch_size=4", "parallelism.reshard_after_forward=false",
             parallelism="fsdp2")
    run_in_process(tmp_path / "single", [*BASE, "train.micro_batch_size=8"])
    assert train_losses(tmp_path / "kept") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-4)


def test_qlora_trains_under_ddp_like_one_process(tmp_path):
    """Each rank quantises rank 0's copy of the built model (transformers saves on rank 0 only)."""
    pytest.importorskip("bitsandbytes")
    qlora = ["peft=lora", "quant=4bit", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128"]
    torchrun(tmp_path / "ddp", *BASE, *qlora, "train.micro_batch_size=4")
    run_in_process(tmp_path / "single", [*BASE, *qlora, "train.micro_batch_size=8"])
    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_a_deepspeed_checkpoint_that_pickles_a_foreign_object_is_refused_unread(tmp_path):
    """DeepSpeed loads its files with pickle: soup checks their globals first."""
    run = tmp_path / "run"
    torchrun(run, *BASE, "train.micro_batch_size=4", "train.max_steps=2", "train.save_every_steps=2",
             parallelism="deepspeed_zero2")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    target = run / "checkpoints" / "step-2" / "zero" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload()}, target, pickle_protocol=2)
    from soup.checkpoint import write_manifest

    write_manifest(run / "checkpoints" / "step-2")  # as an attacker would: the checksums match
    shutil.rmtree(run / "final")
    (run / "run.json").unlink()
    proc = torchrun(run, *BASE, "train.micro_batch_size=4", "train.max_steps=4", "train.save_every_steps=2",
                    "resume=auto", "allow_resume_changes=true", parallelism="deepspeed_zero2", check=False)
    assert proc.returncode != 0 and "holds Python objects that soup will not unpickle" in proc.stderr
    assert "io.open" in proc.stderr and not marker.exists()
