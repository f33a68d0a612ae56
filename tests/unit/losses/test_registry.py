"""The loss registry: names, declared params, errors that name the fix."""

import inspect
import re
import subprocess
import sys

import pytest
import torch

from soup.errors import ConfigError
from soup.losses import preference as P
from soup.losses.preference import PairedLogps
from soup.losses.registry import LOSSES, get_loss, loss_names, register_loss
from soup.losses.unpaired import UnpairedLogps
from tests.conftest import REPO_ROOT

PAIRED = {"sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
          "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "simpo", "cpo", "orpo"}
UNPAIRED = {"kto", "bco"}
REFERENCE_FREE = {"simpo", "cpo", "orpo"}


def paired_batch(reference: bool = True) -> PairedLogps:
    return PairedLogps(chosen=torch.tensor([-3.0, -10.0]), rejected=torch.tensor([-4.0, -6.0]),
                       chosen_tokens=torch.tensor([4, 8]), rejected_tokens=torch.tensor([5, 2]),
                       ref_chosen=torch.tensor([-3.5, -9.0]) if reference else None,
                       ref_rejected=torch.tensor([-3.8, -7.0]) if reference else None)


def test_registry_holds_exactly_the_documented_losses():
    assert set(loss_names("paired")) == PAIRED
    assert set(loss_names("unpaired")) == UNPAIRED
    assert {n for n, s in LOSSES.items() if not s.needs_reference} == REFERENCE_FREE


def test_unknown_name_raises_config_error_listing_the_valid_names():
    with pytest.raises(ConfigError) as info:
        get_loss("dpo_sigmoidd")
    message = str(info.value)
    assert "dpo_sigmoidd" in message
    for name in PAIRED | UNPAIRED:
        assert name in message


def test_unknown_param_is_rejected_by_name():
    with pytest.raises(ConfigError, match="simpo_gamma") as info:
        get_loss("sigmoid")(paired_batch(), beta=0.1, simpo_gamma=0.5)
    assert "beta, label_smoothing" in str(info.value)  # it says what the loss does accept


def test_declared_params_reach_the_function():
    out = get_loss("sigmoid")(paired_batch(), beta=0.3, label_smoothing=0.1)
    assert torch.equal(out.losses, P.dpo_sigmoid(paired_batch(), beta=0.3, label_smoothing=0.1).losses)


def test_defaults_are_read_from_the_signature():
    assert get_loss("simpo").defaults() == {"beta": 2.0, "simpo_gamma": 0.5, "label_smoothing": 0.0}
    assert get_loss("discopop").defaults()["discopop_tau"] == 0.05


def test_duplicate_registration_is_an_error():
    name = "test_only_duplicate_loss"

    def fake(logps, *, beta: float = 0.1):
        """A stand-in (arXiv:0000.00000)."""

    try:
        register_loss(name, kind="paired", needs_reference=True, params=("beta",))(fake)
        with pytest.raises(ValueError, match="already registered"):
            register_loss(name, kind="paired", needs_reference=True, params=("beta",))(fake)
        with pytest.raises(ValueError, match="already registered"):
            register_loss("sigmoid", kind="paired", needs_reference=True, params=("beta",))(fake)
    finally:
        LOSSES.pop(name, None)


def test_registration_checks_params_docstring_and_kind():
    def undocumented(logps, *, beta: float = 0.1):
        pass

    def documented(logps, *, beta: float = 0.1):
        """Doc (arXiv:0000.00000)."""

    with pytest.raises(ValueError, match="docstring"):
        register_loss("test_only_a", kind="paired", needs_reference=True, params=("beta",))(undocumented)
    with pytest.raises(ValueError, match="gamma"):
        register_loss("test_only_b", kind="paired", needs_reference=True, params=("gamma",))(documented)
    with pytest.raises(ValueError, match="kind"):
        register_loss("test_only_c", kind="pairwise", needs_reference=True, params=())
    assert not any(n.startswith("test_only_") for n in LOSSES)


@pytest.mark.parametrize("name", sorted(PAIRED | UNPAIRED))
def test_every_loss_documents_its_paper_and_declares_all_its_params(name):
    spec = LOSSES[name]
    doc = inspect.getdoc(spec.fn)
    assert re.search(r"arXiv:\d{4}\.\d{4,5}", spec.doc), f"first docstring line of '{name}' names no arXiv id"
    for section in ("Args:", "Shapes:"):
        assert section in doc, f"'{name}' docstring lacks {section}"
    keyword_only = [p.name for p in inspect.signature(spec.fn).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert list(spec.params) == keyword_only
    for param in spec.params:
        assert param in doc, f"'{name}' docstring does not describe '{param}'"


def test_reference_free_losses_run_without_reference_and_the_others_refuse():
    for name in sorted(PAIRED):
        spec = get_loss(name)
        if spec.needs_reference:
            with pytest.raises(ValueError, match="reference"):
                spec(paired_batch(reference=False))
        else:
            assert torch.isfinite(spec(paired_batch(reference=False)).losses).all()


def test_wrong_logps_type_for_the_kind_is_rejected():
    unpaired = UnpairedLogps(logps=torch.zeros(2), tokens=torch.ones(2), desirable=torch.tensor([True, False]),
                             ref_logps=torch.zeros(2))
    with pytest.raises(TypeError, match="PairedLogps"):
        get_loss("sigmoid")(unpaired)
    with pytest.raises(TypeError, match="UnpairedLogps"):
        get_loss("kto")(paired_batch())


def test_registry_is_complete_whichever_module_is_imported_first():
    code = ("import soup.losses.unpaired; import soup.losses.preference; "
            "from soup.losses.registry import LOSSES; print(len(LOSSES))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == len(PAIRED | UNPAIRED)
