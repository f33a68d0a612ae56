"""Every optimizer that runs on CPU trains in a real run; 8-bit AdamW and schedule-free resume
bit-exactly. In process (the composed config and soup.train.run, as the CLI calls it): the CLI
path itself is tests/integration/test_cli.py's."""

import json

import pytest
import torch
from safetensors.torch import load_file

from soup.config.validate import OPTIMIZERS
from tests.conftest import run_cli, run_in_process

pytestmark = pytest.mark.slow

RESUMED = ["adamw_8bit", "schedule_free_adamw"]  # their smoke run is the straight run of the resume test
CPU_OPTIMIZERS = [name for name in OPTIMIZERS if not name.startswith("paged_")]  # paging needs CUDA
# Schedule-free schedules itself (validate() insists on sched=constant); GaLore's default rank
# 128 would be full rank on the 32-wide debug model.
EXTRA = {"schedule_free_adamw": ["sched=constant"], "galore": ["optim.galore_rank=8", "optim.galore_update_proj_gap=2"]}


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("name", [name for name in CPU_OPTIMIZERS if name not in RESUMED])
def test_optimizer_trains_in_a_real_run(name, tmp_path):
    run_in_process(tmp_path, ["debug=tiny", f"optim={name}", *EXTRA.get(name, [])])
    losses = train_losses(tmp_path)
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("name", RESUMED)
def test_three_steps_then_resume_equals_six_straight(name, tmp_path, capsys):
    # sched=constant for both, so stopping at max_steps=3 changes no learning rate.
    common = ["debug=tiny", f"optim={name}", "sched=constant", "train.save_every_steps=3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_in_process(straight, common)
    run_in_process(split, [*common, "train.max_steps=3"])
    capsys.readouterr()
    # The 3-step run finished; going on to 6 steps is a change of length, asked for explicitly.
    run_in_process(split, [*common, "resume=auto", "allow_resume_changes=true"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-3" in out
    expected = load_file(str(straight / "final" / "model.safetensors"))
    resumed = load_file(str(split / "final" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), f"optim={name}: {key} differs after resume"
    assert train_losses(split) == train_losses(straight)
    assert len(train_losses(straight)) == 6 and all(loss > 0 for loss in train_losses(straight))


def test_paged_optimizer_on_cpu_is_refused_with_the_fix(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    proc = run_cli("debug=tiny", "optim=paged_adamw_8bit", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "optim=adamw_8bit" in proc.stderr
