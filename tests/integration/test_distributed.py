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
import os
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
# Without DeepSpeed these skip, unless the install must hold every extra (CI: SOUP_REQUIRE_EXTRAS=1).
NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None and
                                  not os.environ.get("SOUP_REQUIRE_EXTRAS"),
                                  reason="DeepSpeed is not installed (the deepspeed extra)")
ZERO = [pytest.param(name, id=name, marks=NO_DEEPSPEED) for name in ("deepspeed_zero2", "deepspeed_zero3")]


def torchrun(run_dir: Path, *overrides: str, parallelism: str = "ddp", check: bool = True):
    return run_cli("--standalone", "--nproc_per_node=2", "-m", "soup.train", f"parallelism={parallelism}",
                   *overrides, f"hydra.run.dir={run_dir}", module="torch.distributed.run", check=check, timeout=600)


def train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def weights(run_dir: Path) -> dict:
    """final/'s trained weights: the whole model, or the adapter."""
    adapter = run_dir / "final" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else run_dir / "final" / "model.safetensors"))


# Each option's straight run, shared by the tests below (a torchrun launch costs ~10 s of imports).
SFT = {"ddp": [], "fsdp2": [], "deepspeed_zero2": ["peft=lora"], "deepspeed_zero3": []}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    runs: dict[str, Path] = {}

    def run(parallelism: str) -> Path:
        if parallelism not in runs:
            runs[parallelism] = tmp_path_factory.mktemp(parallelism) / "straight"
            torchrun(runs[parallelism], *BASE, *SFT[parallelism], "train.micro_batch_size=4",
                     "train.save_every_steps=3", parallelism=parallelism)
        return runs[parallelism]

    return run


def resume_from_step_3(straight_run: Path, into: Path, *overrides: str, parallelism: str) -> None:
    """As if the run had been killed after its step-3 checkpoint: resume=auto from there."""
    shutil.copytree(straight_run, into)
    shutil.rmtree(into / "final")
    (into / "run.json").unlink()
    shutil.rmtree(into / "checkpoints" / "step-6")
    torchrun(into, *overrides, "resume=auto", parallelism=parallelism)


@pytest.mark.parametrize("parallelism", [*PARALLELISMS, *ZERO])
def test_two_ranks_train_like_one_process_with_the_global_batch(tmp_path, straight, parallelism):
    ranks = straight(parallelism)
    run_in_process(tmp_path / "single", [*BASE, *SFT[parallelism], "train.micro_batch_size=8"])
    assert len(train_losses(ranks)) == 6
    assert train_losses(ranks) == pytest.approx(train_losses(tmp_path / "single"), rel=1e-4)
    if not SFT[parallelism]:  # a full fine-tune: final/ is one plain model that transformers loads
        a, b = weights(ranks), weights(tmp_path / "single")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(ranks / "final")
    else:
        assert (ranks / "final" / "adapter_model.safetensors").exists()
    log = (ranks / "train.log").read_text()
    assert log.count(f"[soup] parallelism: {parallelism}, 2 ranks (gloo)") == 1  # rank 0 alone writes


@pytest.mark.parametrize("parallelism", [*PARALLELISMS, *ZERO])
def test_a_run_of_ranks_resumes_exactly_at_the_same_world_size(tmp_path, straight, parallelism):
    ranks = straight(parallelism)
    resume_from_step_3(ranks, tmp_path / "resumed", *BASE, *SFT[parallelism], "train.micro_batch_size=4",
                       "train.save_every_steps=3", parallelism=parallelism)
    a, b = weights(ranks), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "resumed") == train_losses(ranks)
    written = {p.relative_to(ranks / "checkpoints" / "step-3").as_posix()
               for p in (ranks / "checkpoints" / "step-3").rglob("*")}
    if parallelism == "fsdp2":  # each rank wrote its own shards
        assert written >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    if parallelism.startswith("deepspeed"):
        assert written >= {f"zero/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}


@pytest.mark.parametrize("parallelism, extra", [("ddp", []), ("fsdp2", ["parallelism.reshard_after_forward=false"])])
def test_dpo_with_lora_trains_like_one_process_and_resumes_exactly(tmp_path, parallelism, extra):
    """The preference loss with the adapter-disabled reference (fsdp2: blocks kept gathered
    after the forward) matches one process, and resumes bit-exactly."""
    dpo = [*BASE, "task=dpo", "peft=lora", "train.save_every_steps=3"]
    torchrun(tmp_path / "straight", *dpo, "train.micro_batch_size=4", *extra, parallelism=parallelism)
    run_in_process(tmp_path / "single", [*dpo, "train.micro_batch_size=8"])
    assert train_losses(tmp_path / "straight") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-4)
    resume_from_step_3(tmp_path / "straight", tmp_path / "resumed", *dpo, "train.micro_batch_size=4", *extra,
                       parallelism=parallelism)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rank_rng = torch.load(tmp_path / "straight" / "checkpoints" / "step-3" / "extra.pt", weights_only=True)["rank_rng"]
    assert len(rank_rng) == 2  # each rank's generators, restored on that rank


def test_ddp_without_torchrun_prints_the_torchrun_command(tmp_path):
    proc = run_cli("parallelism=ddp", "debug=tiny", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "torchrun --nproc_per_node 2 -m soup.train parallelism=ddp" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bco_folds_every_ranks_rewards_into_one_reward_shift(tmp_path):
    """BCO's delta is the running mean of every reward so far: each step, every rank folds in
    all ranks' rewards, so 2 ranks train as one process with the global batch does (with each
    rank's own mean, the ranks' deltas would differ: at this lr, 1e-3 relative by step 2)."""
    bco = [*BASE, "task=bco", "peft=lora", "optim.lr=1e-2"]
    torchrun(tmp_path / "ddp", *bco, "train.micro_batch_size=4")
    run_in_process(tmp_path / "single", [*bco, "train.micro_batch_size=8"])
    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(tmp_path / "single"), rel=1e-4)


def test_a_refusal_on_rank_0_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 alone checks the run dir; the other ranks wait for it and stop with its error."""
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # an unfinished run that a fresh run would overwrite
    proc = torchrun(tmp_path, *BASE, check=False)
    assert proc.returncode != 0 and proc.stderr.count("already holds an unfinished run") == 1
    assert "exitcode  : 2" in proc.stderr and "exitcode  : 1" not in proc.stderr  # both ranks: a user error
    assert "Connection closed by peer" not in proc.stderr


def test_torchrun_with_one_process_parallelism_is_refused(tmp_path):
    proc = run_cli("--standalone", "--nproc_per_node=2", "-m", "soup.train", "debug=tiny",
                   f"hydra.run.dir={tmp_path}", module="torch.distributed.run", check=False)
    assert proc.returncode != 0 and "parallelism=single trains in one" in proc.stderr


# GRPO with what moves between steps: mu=2 (a generation batch trained twice, with its old
# log-probs), and a reference copy pulled toward the policy every 2 steps.
GRPO = ["task=grpo", "debug=tiny", "task.num_generations=4", "task.max_completion_length=8",
        "train.micro_batch_size=2", "train.max_steps=4", "task.beta=0.1", "task.num_iterations=2",
        "task.ref_sync_steps=2", "train.eval_every_steps=0", "train.save_every_steps=3", "train.progress_bar=false"]


@pytest.fixture(scope="module")
def grpo_ddp(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("grpo")
    (root / "len.py").write_text("def reward_fn(completions, **columns):\n"
                                 "    return [len(c) / 10 for c in completions]\n")
    overrides = [*GRPO, f"task.reward=[{root / 'len.py'}]"]
    torchrun(root / "ddp", *overrides)
    return root / "ddp", overrides


def test_grpo_samples_on_every_rank_and_resumes_each_ranks_rollouts(tmp_path, grpo_ddp):
    """Each rank rolls out its own prompts (seeded by step and rank); the step reads both
    ranks' share. A resume in the middle of a generation batch (step 3 of mu=2) gives each
    rank back its own batch, so the run goes on exactly."""
    run, overrides = grpo_ddp
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    # 58 prompts (6 held out) make ceil(58 / (2 ranks x 2)) = 15 draws per epoch; 2 of them done
    assert len(train) == 4 and train[-1]["epoch"] == pytest.approx(2 / 15)
    assert train[-1]["trained_tokens"] > 0
    extra = torch.load(run / "checkpoints" / "step-3" / "extra.pt", weights_only=True)
    batches = [rank["experience"]["batches"] for rank in extra["rank_task"]]
    assert len(batches) == 2 and not torch.equal(batches[0][0]["completion_ids"], batches[1][0]["completion_ids"])
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "final")
    (resumed / "run.json").unlink()
    torchrun(resumed, *overrides, "resume=auto")
    assert train_losses(resumed) == train_losses(run)
    assert all(torch.equal(a, b) for a, b in zip(weights(run).values(), weights(resumed).values()))


@pytest.mark.parametrize("parallelism", ["fsdp2", ZERO[1]])
def test_grpo_under_sharded_weights_trains_like_ddp(grpo_ddp, tmp_path, parallelism):
    """Sharded, every rank gathers the weights in each decoding forward, so the ranks decode
    in lockstep; the reference copy is pulled toward the gathered policy. The same seeds draw
    the same completions as under ddp, so the losses agree to the tolerance above. (ZeRO-2
    keeps full weights on every rank: its rollouts are ddp's, its step is ZeRO-3's engine.)"""
    run, overrides = grpo_ddp
    torchrun(tmp_path / parallelism, *overrides, "train.save_every_steps=0", parallelism=parallelism)
    assert train_losses(tmp_path / parallelism) == pytest.approx(train_losses(run), rel=1e-4)


QLORA = [*BASE, "peft=lora", "quant=4bit", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128"]


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp2"])
def test_qlora_trains_like_one_process(tmp_path, parallelism):
    """ddp: each rank quantises rank 0's copy of the built model (transformers saves on rank 0
    only). fsdp2: fully_shard shards the packed 4-bit codes beside the adapters, parameter by
    parameter (so, unlike FSDP1's flat buffers, quant.quant_storage need not match the compute
    dtype); its sharded checkpoint resumes exactly, and final/ is the adapter alone."""
    pytest.importorskip("bitsandbytes")
    run = tmp_path / parallelism
    torchrun(run, *QLORA, "train.micro_batch_size=4", "train.save_every_steps=3", parallelism=parallelism)
    run_in_process(tmp_path / "single", [*QLORA, "train.micro_batch_size=8"])
    assert train_losses(run) == pytest.approx(train_losses(tmp_path / "single"), rel=1e-4)
    a, b = weights(run), weights(tmp_path / "single")
    assert a.keys() == b.keys() and all("lora_" in key for key in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4)
    if parallelism == "fsdp2":
        resume_from_step_3(run, tmp_path / "resumed", *QLORA, "train.micro_batch_size=4", "train.save_every_steps=3",
                           parallelism=parallelism)
        assert train_losses(tmp_path / "resumed") == train_losses(run)
        assert all(torch.equal(a[k], weights(tmp_path / "resumed")[k]) for k in a)


@NO_DEEPSPEED
def test_a_deepspeed_checkpoint_that_pickles_a_foreign_object_is_refused_unread(tmp_path, straight):
    """DeepSpeed loads its files with pickle: soup checks their globals first."""
    from soup.checkpoint import write_manifest

    run = tmp_path / "run"
    shutil.copytree(straight("deepspeed_zero2"), run)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    step = run / "checkpoints" / "step-6"
    torch.save({"module": Payload()}, step / "zero" / "mp_rank_00_model_states.pt", pickle_protocol=2)
    write_manifest(step)  # as an attacker would: the checksums match
    shutil.rmtree(run / "final")
    (run / "run.json").unlink()
    proc = torchrun(run, *BASE, *SFT["deepspeed_zero2"], "train.micro_batch_size=4", "train.save_every_steps=3",
                    "resume=auto", parallelism="deepspeed_zero2", check=False)
    assert proc.returncode != 0 and "holds Python objects that soup will not unpickle" in proc.stderr
    assert "io.open" in proc.stderr and not marker.exists()
