"""Quiet by default: the `biofm` command shows its own results and warnings, not its dependencies' chatter.

Without `-v`, Lightning shows its warnings and its notes on resuming and on distributed processes only (no
tips to install other products, no device lines), and the
known deprecation warnings that our pinned dependencies raise among themselves — not from biofm's use of
them, which we fix instead — are not shown; `-v` shows all of it, `-q` also hides biofm's own progress
notes (results and errors are always printed).
"""

from __future__ import annotations

import logging
import os
import warnings

# (message pattern, category): raised inside the dependencies at our pinned versions
KNOWN_WARNINGS = [
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", Warning),  # Lightning's pytree helper on torch 2.13
    (r".*was deprecated in v4\.49\.0.*", Warning),  # jsonargparse API that LightningCLI 2.6 calls
    (r".*LightningCLI's args parameter is intended.*", Warning),
    (r".*does not have many workers.*", Warning),  # our stream sizes its own workers
]
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# what Lightning says at INFO that a user does need: where a run resumes from, the processes of a distributed run
KEPT = ("Restoring states from", "Restored all states", "Initializing distributed")


class _Needed(logging.Filter):
    """Lightning's warnings, and of its notes only those in `kept`."""

    def __init__(self, kept: tuple[str, ...]):
        super().__init__()
        self.kept = kept

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.getMessage().startswith(self.kept)


log = logging.getLogger("biofm")
_verbosity = 0  # the last `configure`'s


def configure(verbosity: int | None = None, lightning: bool = False, kept: tuple[str, ...] = KEPT) -> None:
    """`verbosity` -1 (`-q`), 0 (default) or 1 (`-v`); None keeps the last one. Lightning sets its loggers to
    INFO when it is imported, so a command that trains or predicts configures with `lightning=True` (importing
    it first). `kept`: Lightning's notes still shown by default (the demo, which restores its own checkpoints,
    keeps none)."""
    global _verbosity
    verbosity = _verbosity if verbosity is None else verbosity
    _verbosity = verbosity
    if lightning:
        import lightning.pytorch  # noqa: F401
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING if verbosity < 0 else logging.INFO)
        targets = logger.handlers or [logger]  # Lightning's own handler (records of its children pass it)
        for target in targets:
            for existing in [f for f in target.filters if isinstance(f, _Needed)]:
                target.removeFilter(existing)
            if verbosity == 0:
                target.addFilter(_Needed(kept))
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("biofm: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    if verbosity <= 0:
        for message, category in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        os.environ.setdefault("WANDB_SILENT", "true")


def verbosity_of(argv: list[str]) -> tuple[int, list[str]]:
    """`-v` / `--verbose` and `-q` / `--quiet` taken out of `argv` (anywhere: the Lightning subcommands'
    parser does not know them)."""
    flags = {"-v": 1, "--verbose": 1, "-q": -1, "--quiet": -1}
    level = sum(flags[a] for a in argv if a in flags)
    return max(-1, min(1, level)), [a for a in argv if a not in flags]
