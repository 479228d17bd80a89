"""The one family of expected errors: what a user's input, files or folders cause, as opposed to bugs.

Every error ecellm raises on purpose derives from `EcellmError` and is raised where the condition is detected, with
a message that names the file, key, record or flag. The `ecellm` command prints such an error as one line and exits
with status 1; any other exception is a bug and shows its traceback. The subclasses also derive from the builtin
they used to be (`ValueError`, `RuntimeError`), so `except ValueError` in a user's code keeps working.

`exit_on_error` is how every command (`ecellm.cli`, `python -m ecellm.train`, `python -m ecellm.eval`) tells them.
This module is at the bottom of the import order (CONTRIBUTING.md): it imports nothing of ecellm's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class EcellmError(Exception):
    """Base of every expected error: bad input, a file or folder that cannot be used, a refused resume."""


class FlagError(EcellmError, ValueError):
    """A flag's value that cannot be used (a folder that does not exist, an output folder that is a file, an unknown
    model name), found before anything is loaded; the message names the flag."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors that a user's input, files or folders cause (told in one line), as opposed to bugs: the
    `EcellmError` family, and `OSError` (a missing file, a full disk, a denied permission)."""
    return EcellmError, OSError


def exit_on_error(prog: str, command: Callable[[], T]) -> T:
    """`command()`, ending an expected error (`expected_errors`) in the line `{prog}: error: {message}` on stderr
    and exit status 1, and Ctrl-C (KeyboardInterrupt) in the line `{prog}: interrupted` and exit status 130 (the
    shell's 128 + SIGINT). Any other exception is a bug: it goes on, with its traceback.

    Args:
        prog: the command's name, as its messages start.
        command: the command's work.
    """
    try:
        return command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except expected_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
