"""The one kind of error a user can fix from its message alone: a bad setting, a missing or damaged file, an
unusable input. Every command prints it as one line, without a traceback, and the Prefect flow does not
retry it. Each module's own error derives from `UserError` beside its usual base type."""

from __future__ import annotations

from moder.params import ParamsError


class UserError(Exception):
    """An error whose message names the file, key or value at fault and what to do about it."""


class TrainingDiverged(UserError, ArithmeticError):
    """The loss of training or pre-training became non-finite; nothing is returned (so nothing is saved)."""


# ParamsError is the schema's own (moder.params imports nothing from the library, this module included)
USER_ERRORS: tuple[type[Exception], ...] = (UserError, ParamsError)
