"""User-facing errors: each names what is wrong (file, line or flag) and the fix.

The entry point prints these without a traceback; anything else is a bug in soup
and keeps its traceback.
"""

from __future__ import annotations


class SoupError(Exception):
    """A mistake in the user's config, data or environment, with the fix."""


class ConfigError(SoupError):
    """A combination of flags that cannot work; raised before any model loads."""


class DataError(SoupError):
    """A problem with a data file, located by file and (where known) line."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, fix: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        text = f"{where}{message}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)
        self.path, self.line, self.fix = path, line, fix


class MissingDependency(SoupError):
    """An optional package a config asked for is not installed."""

    def __init__(self, package: str, extra: str, wanted_by: str):
        super().__init__(
            f"{wanted_by} needs the optional package '{package}', which is not installed.\n"
            f"  fix: pip install 'soup-harness[{extra}]'   (or: pip install {package})"
        )


def require(module: str, *, package: str | None = None, extra: str, wanted_by: str):
    """Import an optional module lazily, or raise MissingDependency naming the pip command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(package or module, extra, wanted_by) from exc


class Problems:
    """Every problem of a config, collected so that one run of the checks reports them all.

        problems = Problems()
        problems.need(cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: at least 1.")
        problems.one_of("device", cfg.device, ("auto", "cpu", "cuda"))
        problems.raise_any()
    """

    def __init__(self) -> None:
        self.messages: list[str] = []

    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.messages.append(message)

    def one_of(self, flag: str, value, valid) -> None:
        self.need(value in valid, f"{flag}={value!r} is not an option; valid: {', '.join(map(str, valid))}.")

    def raise_any(self) -> None:
        if self.messages:
            raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in self.messages))
