"""The one exception type for bad user input (config values, data files, checkpoints), and how commands report it.

Every command (`python -m lit_iiet fit`, `... convert`, `... evaluate` and the others) turns it into a one-line
message and exit code 2 instead of a traceback. It lives outside `nn/` so that the pure
PyTorch code can raise it without importing Lightning.
"""

import sys
from contextlib import contextmanager
from dataclasses import fields
from typing import Literal, get_args, get_origin, get_type_hints


class UserInputError(ValueError):
    """A value given by the user is not allowed; the message names the value and what is allowed."""


def check_choices(config, prefix: str = "") -> None:
    """Check every Literal field of a config dataclass, as jsonargparse does on the command line: dataclasses built
    in Python do not check their types."""
    hints = get_type_hints(type(config))
    for f in fields(config):
        if get_origin(hints[f.name]) is Literal:
            value, allowed = getattr(config, f.name), get_args(hints[f.name])
            if value not in allowed:
                raise UserInputError(
                    f"unknown {prefix}{f.name} {value!r}; choose one of {', '.join(map(str, allowed))}"
                )


def user_error_in(error: BaseException | None) -> UserInputError | None:
    """The UserInputError behind an exception: jsonargparse and Lightning wrap errors raised in __init__ or hooks."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserInputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def exit_on_user_error():
    """Bad input anywhere inside ends the program with one line `lit_iiet: error: ...` and exit code 2."""
    try:
        yield
    except Exception as e:
        cause = user_error_in(e)
        if cause is None:
            raise
        print(f"lit_iiet: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
