"""The errors a user can cause, each turned into one line and exit status 2 by the CLI.

They live together (and import nothing) so that any stage can name them without importing
the store, the model code or the readers that raise them.
"""

from __future__ import annotations


class EvoCompError(Exception):
    """Base of every user-facing error; the message names the culprit and what was expected."""


class ParamsError(EvoCompError, ValueError):
    """params.yaml is missing, malformed or has a bad key; the message names it."""


class DatasetError(EvoCompError, ValueError):
    """A dataset file or record is unusable; the message names it and says why."""


class ModelError(EvoCompError, ValueError):
    """A checkpoint cannot be used (not found, an unsupported family, a shape mismatch)."""


class StoreError(EvoCompError, RuntimeError):
    """A store problem the user can act on (unreachable URL, unwritable path, bad schema)."""


class OutputError(EvoCompError, OSError):
    """An output path cannot be written (a read-only folder, a file where a folder should be)."""
