"""Where soup.eval finds the model and its run (soup/eval.py locate)."""

from __future__ import annotations

import json

from soup.eval import locate


def test_a_run_dir_its_final_and_a_plain_model_folder_are_told_apart(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("train:\n  precision: fp32\n")
    # a run killed between final/ and run.json: the config comes from .hydra/
    located = locate(str(run))
    assert (located.model_dir, located.run_dir, located.step) == (run / "final", run, 0)
    assert located.run_config.train.precision == "fp32"
    (run / "run.json").write_text(json.dumps({"config": {"train": {"precision": "bf16"}}, "stats": {"steps": 7}}))
    located = locate(str(run / "final"))
    assert (located.run_dir, located.step, located.run_config.train.precision) == (run, 7, "bf16")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert (locate(str(model)).run_dir, locate(str(model)).run_config) == (None, None)
