"""The errors manynets expects and explains: the CLI prints each as one ``manynets: error: ...`` line, exit 2.

Every expected failure (a bad config value, a missing or malformed data file, a checkpoint that does
not fit, training that diverged) raises a subclass of :class:`ManynetsError` at the place where the bad
value enters, with a message that names the argument as the user writes it, the value, what was
expected and the fix. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class ManynetsError(Exception):
    """Base of every error the ``manynets`` command reports as a one-line message."""


class ConfigError(ManynetsError, ValueError):
    """An argument is out of range, of the wrong kind, or inconsistent with another one."""


class DataError(ManynetsError, RuntimeError):
    """A data set is missing or malformed; the message names the path, the expected layout and the fix."""


class CheckpointMismatchError(ManynetsError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model the config builds."""


class CheckpointNotFoundError(CheckpointMismatchError, FileNotFoundError):
    """A checkpoint file that does not exist (also a ``FileNotFoundError``)."""


class RunDirectoryError(ManynetsError, RuntimeError):
    """The run directory cannot be written, or already holds another run's checkpoints."""


class NonFiniteError(ManynetsError, FloatingPointError):
    """Training diverged: a NaN/inf loss, a whole epoch of skipped steps, or non-finite weights."""


def check_arg(ok: bool, name: str, value: Any, expected: str, fix: str = "") -> None:
    """Raise :class:`ConfigError` unless ``ok``.

    ``name`` is the argument as the user writes it (``model.init_args.alpha``), ``expected`` the rule
    (``>= 0``), ``fix`` an optional hint. Example message::

        model.init_args.alpha = -1.0: expected >= 0 (0 turns mixing off).
    """
    if not ok:
        raise ConfigError(f"{name} = {value!r}: expected {expected}." + (f" {fix}" if fix else ""))
