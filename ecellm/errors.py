"""The one family of expected errors: what a user's input, files or folders cause, as opposed to bugs.

Every error ecellm raises on purpose derives from `EcellmError` and is raised where the condition is detected, with
a message that names the file, key, record or flag. The `ecellm` command prints such an error as one line and exits
with status 1; any other exception is a bug and shows its traceback. The subclasses also derive from the builtin
they used to be (`ValueError`, `RuntimeError`), so `except ValueError` in a user's code keeps working.

This module is at the bottom of the import order (CONTRIBUTING.md): it imports nothing of ecellm's.
"""

from __future__ import annotations


class EcellmError(Exception):
    """Base of every expected error: bad input, a file or folder that cannot be used, a refused resume."""
