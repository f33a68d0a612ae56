"""Preference losses by name: the task code asks for `loss.name` and never branches on it.

Adding a variant is one decorated function (in `preference.py` for chosen/rejected pairs,
`unpaired.py` for KTO-style labelled rows) plus one test:

    @register_loss("my_loss", kind="paired", needs_reference=True, params=("beta",))
    def my_loss(logps: PairedLogps, *, beta: float = 0.1) -> PreferenceLossOutput:
        \"\"\"One line: what it is (arXiv id). ...\"\"\"

`params` lists the keyword names the function reads; `LossSpec.__call__` passes exactly
those and rejects any other, so a misspelt or misplaced flag fails before training starts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Literal

from soup.errors import ConfigError

LossKind = Literal["paired", "unpaired"]


@dataclass(frozen=True)
class LossSpec:
    """One registered loss.

    name: the registry key (the value of the `loss` flag).
    fn: the pure loss function, `fn(logps, **params) -> output`.
    kind: "paired" (takes `PairedLogps`) or "unpaired" (takes `UnpairedLogps`).
    needs_reference: whether the caller must run a reference model and fill `ref_*`.
    params: the keyword-only parameter names `fn` reads; nothing else may be passed.
    doc: the first line of `fn`'s docstring, for listings.
    """

    name: str
    fn: Callable[..., Any]
    kind: LossKind
    needs_reference: bool
    params: tuple[str, ...]
    doc: str

    def defaults(self) -> dict[str, Any]:
        """The function's default for each declared param, e.g. {"beta": 0.1}."""
        signature = inspect.signature(self.fn)
        return {name: signature.parameters[name].default for name in self.params}

    def __call__(self, logps: Any, **params: Any) -> Any:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            accepted = ", ".join(self.params) or "(none)"
            raise ConfigError(
                f"loss '{self.name}' does not take parameter(s) {', '.join(unknown)}; "
                f"it accepts: {accepted}.\n  fix: remove the flag(s) or pick a loss that uses them."
            )
        expected = _logps_type(self.kind)
        if not isinstance(logps, expected):
            raise TypeError(f"loss '{self.name}' is {self.kind} and takes {expected.__name__}, "
                            f"got {type(logps).__name__}")
        return self.fn(logps, **params)


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, kind: LossKind, needs_reference: bool,
                  params: tuple[str, ...]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add `fn` to `LOSSES` under `name`; returns `fn` unchanged.

    Checked at import time, so a broken registration fails every test run: the name is
    new, `kind` is known, `fn` has a docstring, and every entry of `params` is a
    keyword-only parameter of `fn`.
    """
    if kind not in ("paired", "unpaired"):
        raise ValueError(f"register_loss('{name}'): kind must be 'paired' or 'unpaired', got {kind!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' is already registered (by {LOSSES[name].fn.__module__}."
                             f"{LOSSES[name].fn.__qualname__}); pick another name")
        doc = inspect.getdoc(fn)
        if not doc:
            raise ValueError(f"loss '{name}' ({fn.__qualname__}) needs a docstring: formula, paper, shapes")
        keyword_only = {p.name for p in inspect.signature(fn).parameters.values()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY}
        missing = [p for p in params if p not in keyword_only]
        if missing:
            raise ValueError(f"loss '{name}' declares params {missing} that are not keyword-only "
                             f"parameters of {fn.__qualname__}")
        LOSSES[name] = LossSpec(name=name, fn=fn, kind=kind, needs_reference=needs_reference,
                                params=tuple(params), doc=doc.splitlines()[0])
        return fn

    return decorate


def get_loss(name: str) -> LossSpec:
    """The spec registered under `name`; ConfigError listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(
            f"unknown loss '{name}'.\n  fix: use one of: {', '.join(sorted(LOSSES))}"
        ) from None


def loss_names(kind: LossKind | None = None) -> list[str]:
    """Sorted registry keys, optionally only those of one kind."""
    return sorted(n for n, spec in LOSSES.items() if kind is None or spec.kind == kind)


def _logps_type(kind: LossKind) -> type:
    return _preference.PairedLogps if kind == "paired" else _unpaired.UnpairedLogps


# The built-in losses register themselves when their modules are imported. Importing them
# here (after register_loss exists, so the cycle resolves) means LOSSES is complete
# whichever of registry / preference / unpaired a caller imports first.
from soup.losses import preference as _preference  # noqa: E402
from soup.losses import unpaired as _unpaired  # noqa: E402
