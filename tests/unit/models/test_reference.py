"""Reference models (soup/models/reference.py): three strategies, one set of numbers; the disk cache."""

from __future__ import annotations

import contextlib
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import ModelConfig, PeftConfig, PreferenceTaskConfig
from soup.data.collate import collate_pairs
from soup.models.load import apply_peft, build_model
from soup.models.reference import (
    DisabledAdapterReference,
    FrozenCopyReference,
    attach_reference_logps,
    weights_fingerprint,
)
from soup.models.tokenizer import build_byte_tokenizer
from soup.tasks.logps import sequence_logps
from soup.tasks.preference import PreferenceTask

CPU = torch.device("cpu")
PAIR_KEYS = (("ref_chosen", "ref_rejected"), ("prompt_ids", "chosen_ids", "rejected_ids"))
EXAMPLES = [
    {"prompt_ids": [1, 50, 51], "chosen_ids": [60, 61, 62, 2], "rejected_ids": [70, 2]},
    {"prompt_ids": [1, 52], "chosen_ids": [63, 2], "rejected_ids": [71, 72, 73, 74, 2]},
    {"prompt_ids": [1, 53, 54, 55], "chosen_ids": [64, 65, 2], "rejected_ids": [75, 76, 2]},
]


def tiny_model(seed: int = 0):
    cfg = OmegaConf.structured(ModelConfig(name="tiny"))
    cfg.tiny.merge_with({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1})
    return build_model(cfg, build_byte_tokenizer(), seed)


def lora(model):
    return apply_peft(model, OmegaConf.structured(PeftConfig(name="lora", r=4, alpha=8.0)), seed=0)


def collate(examples):
    return collate_pairs(examples, pad_token_id=0)


def examples():
    return copy.deepcopy(EXAMPLES)


def attach(examples, reference, cache_dir, model_key):
    return attach_reference_logps(examples, reference, collate, 2, CPU, *PAIR_KEYS, cache_dir, model_key)


def dpo_task(**overrides) -> PreferenceTask:
    return PreferenceTask(OmegaConf.structured(PreferenceTaskConfig(name="dpo", **overrides)))


def test_copy_adapter_and_precomputed_references_agree_and_give_the_same_dpo_loss_at_step_zero(tmp_path):
    full = tiny_model()
    # LoRA's B starts at zero, so the adapted model computes exactly what its base does.
    adapted = lora(copy.deepcopy(full))
    splits = {name: SimpleNamespace(train=examples(), val=None) for name in ("copy", "adapter", "precomputed")}
    tasks = {
        "copy": (dpo_task(reference="copy"), full, "none"),
        "adapter": (dpo_task(reference="adapter"), adapted, "lora"),
        "precomputed": (dpo_task(reference="precomputed", ref_cache_dir=str(tmp_path)), full, "none"),
    }
    ref_logps, losses = {}, {}
    for name, (task, policy, peft_name) in tasks.items():
        line = task.build_reference(policy, peft_name, splits[name], collate, 2, CPU, "fp32", contextlib.nullcontext)
        assert line.startswith(f"reference: {name}")
        batch = collate(splits[name].train)
        ref_logps[name] = batch["ref_logps"] if name == "precomputed" else task.reference.logps(batch)
        policy.train()
        out = task.forward(policy, batch)
        losses[name] = float(out.loss_sum.detach()) / task.units(batch)

    assert isinstance(tasks["copy"][0].reference, FrozenCopyReference)
    assert isinstance(tasks["adapter"][0].reference, DisabledAdapterReference)
    assert tasks["precomputed"][0].reference is None  # the numbers live in the examples
    torch.testing.assert_close(ref_logps["adapter"], ref_logps["copy"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_logps["precomputed"], ref_logps["copy"], atol=1e-5, rtol=0)
    for name, loss in losses.items():
        assert loss == pytest.approx(math.log(2), abs=1e-5), name  # policy == reference
        assert loss == pytest.approx(losses["copy"], abs=1e-5), name


def test_precompute_with_adapter_on_a_lora_model_matches_the_full_model_copy(tmp_path):
    full = tiny_model()
    adapted = lora(copy.deepcopy(full))
    via_adapter, via_copy = examples(), examples()
    assert attach(via_adapter, DisabledAdapterReference(adapted), tmp_path / "a", "adapter") is False
    assert attach(via_copy, FrozenCopyReference(full), tmp_path / "c", "copy") is False
    for a, c in zip(via_adapter, via_copy):
        assert a["ref_chosen"] == pytest.approx(c["ref_chosen"], abs=1e-5)
        assert a["ref_rejected"] == pytest.approx(c["ref_rejected"], abs=1e-5)


def test_attached_values_are_the_sequence_logps_of_chosen_then_rejected_rows(tmp_path):
    model = tiny_model()
    rows = examples()
    attach(rows, FrozenCopyReference(model), None, "k")
    with torch.no_grad():
        logps, _ = sequence_logps(model, collate(EXAMPLES))
    n = len(EXAMPLES)
    assert [r["ref_chosen"] for r in rows] == pytest.approx(logps[:n].tolist(), abs=1e-5)
    assert [r["ref_rejected"] for r in rows] == pytest.approx(logps[n:].tolist(), abs=1e-5)


class Unusable:
    """A reference that must not be asked: a cache hit needs no forward pass."""

    def logps(self, batch):
        raise AssertionError("the cache should have answered")


def test_second_call_reads_the_cache_and_recomputing_gives_the_same_numbers(tmp_path):
    model = tiny_model()
    key = weights_fingerprint(model)
    first, second, third = examples(), examples(), examples()
    assert attach(first, FrozenCopyReference(model), tmp_path, key) is False
    assert attach(second, Unusable(), tmp_path, key) is True
    assert second == first
    (cache_file,) = tmp_path.glob("*.pt")
    cache_file.unlink()
    assert attach(third, FrozenCopyReference(model), tmp_path, key) is False
    assert third == first


def test_another_model_misses_the_cache(tmp_path):
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    assert weights_fingerprint(model) != weights_fingerprint(other)
    first, second = examples(), examples()
    attach(first, FrozenCopyReference(model), tmp_path, weights_fingerprint(model))
    assert attach(second, FrozenCopyReference(other), tmp_path, weights_fingerprint(other)) is False
    assert second[0]["ref_chosen"] != first[0]["ref_chosen"]
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_other_token_ids_miss_the_cache(tmp_path):
    model = tiny_model()
    key = weights_fingerprint(model)
    attach(examples(), FrozenCopyReference(model), tmp_path, key)
    changed = examples()
    changed[2]["rejected_ids"] = [75, 77, 2]
    assert attach(changed, FrozenCopyReference(model), tmp_path, key) is False
    fewer = examples()[:2]
    assert attach(fewer, FrozenCopyReference(model), tmp_path, key) is False


def test_weights_fingerprint_ignores_lora_weights_but_sees_base_weights():
    adapted = lora(tiny_model())
    before = weights_fingerprint(adapted)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    assert weights_fingerprint(adapted) == before  # the reference never sees adapters
    with torch.no_grad():
        adapted.get_base_model().model.norm.weight.add_(0.5)
    assert weights_fingerprint(adapted) != before


def test_frozen_copy_is_frozen_and_does_not_follow_the_policy():
    policy = tiny_model()
    reference = FrozenCopyReference(policy)
    assert not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
    batch = collate(EXAMPLES)
    before = reference.logps(batch)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    torch.testing.assert_close(reference.logps(batch), before, atol=0, rtol=0)


def test_refresh_from_copies_the_policys_current_weights():
    policy = tiny_model()
    reference = FrozenCopyReference(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1.5)
    reference.refresh_from(policy)
    for (name, ref_param), param in zip(reference.model.named_parameters(), policy.parameters()):
        assert torch.equal(ref_param, param), name
        assert ref_param.data_ptr() != param.data_ptr(), name  # copied, not shared
    batch = collate(EXAMPLES)
    with torch.no_grad():
        torch.testing.assert_close(reference.logps(batch), sequence_logps(policy, batch)[0], atol=1e-6, rtol=0)


def test_adapter_reference_scores_the_base_and_leaves_train_mode_and_adapters_as_they_were():
    full = tiny_model()
    adapted = lora(copy.deepcopy(full))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # the adapted policy now differs from its base
    adapted.train()
    batch = collate(EXAMPLES)
    reference = DisabledAdapterReference(adapted)
    with torch.no_grad():
        base = sequence_logps(full, batch)[0]
        policy = sequence_logps(adapted, batch)[0]
    assert not torch.allclose(policy, base, atol=1e-3)
    torch.testing.assert_close(reference.logps(batch), base, atol=1e-5, rtol=0)
    assert adapted.training
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(adapted, batch)[0], policy, atol=0, rtol=0)


def test_adapter_reference_needs_a_peft_model():
    with pytest.raises(TypeError, match="peft"):
        DisabledAdapterReference(tiny_model())
