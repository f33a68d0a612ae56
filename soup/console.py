"""The run's console, kept in its run dir: train.log holds what the terminal showed.

Hydra's job logging already writes Python `logging` records to <run dir>/train.log;
soup reports with print(), so the file stayed empty. `copied_to` tees stdout into the
same file (both append, so lines interleave in the order they happen), and
`report_error` writes an error to stderr and to the file. The progress bar (stderr,
redrawn in place) stays out of the file.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, TextIO


class _Tee:
    """A text stream that writes to the console stream and to a file."""

    def __init__(self, console: TextIO, file: TextIO):
        self._console, self._file = console, file

    def write(self, text: str) -> int:
        self._console.write(text)
        self._file.write(text)
        self._file.flush()  # a killed run keeps every line it printed
        return len(text)

    def flush(self) -> None:
        self._console.flush()
        self._file.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding ... are the console's
        return getattr(self._console, name)


class RunConsole:
    def __init__(self, log_path: Path | None):
        self.log_path = log_path
        self._file: TextIO | None = None

    def report_error(self, text: str) -> None:
        print(text, file=sys.stderr)
        if self._file is not None:
            self._file.write(text + "\n")
            self._file.flush()


@contextlib.contextmanager
def copied_to(log_path: Path) -> Iterator[RunConsole]:
    """Tee sys.stdout into `log_path` (appending) for the duration of the block."""
    console = RunConsole(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as file:
        console._file = file
        original = sys.stdout
        sys.stdout = _Tee(original, file)
        try:
            yield console
        finally:
            sys.stdout = original
            console._file = None


@contextlib.contextmanager
def silenced() -> Iterator[RunConsole]:
    """Drop stdout for the block (a rank other than 0 under torchrun); errors still go to stderr."""
    original = sys.stdout
    sys.stdout = open(os.devnull, "w", encoding="utf-8")
    try:
        yield RunConsole(None)
    finally:
        sys.stdout.close()
        sys.stdout = original


def hydra_cli(main, user_error: int = 2) -> None:
    """Run a @hydra.main entry point so that Hydra's own user errors (an unknown key, a bad
    override) exit with soup's user-error status, not Hydra's 1, which a crash in soup also gives."""
    from hydra.errors import HydraException

    try:
        main()
    except SystemExit as exit_:
        # Hydra prints its error, then exits 1 from inside the handler that caught it.
        if exit_.code == 1 and isinstance(exit_.__context__, HydraException):
            sys.exit(user_error)
        raise


def hydra_job(run, user_error: int = 2):
    """The body of a @hydra.main entry point: `run(run_dir, overrides)` with the console copied to
    <run dir>/<job>.log. A SoupError (a user mistake) is printed without a traceback and exits
    `user_error`, or, in a multirun, fails that job alone (returns None)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from soup.errors import SoupError

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    with copied_to(run_dir / f"{hydra_cfg.job.name}.log") as console:
        try:
            return run(run_dir, list(hydra_cfg.overrides.task))
        except SoupError as exc:
            console.report_error(f"[soup] error: {exc}")
            if hydra_cfg.mode == RunMode.MULTIRUN:
                return None  # one bad job must not end the sweep
            sys.exit(user_error)
