"""What the user got wrong, told apart from what zoo got wrong.

`UserError` marks an exception whose message is a complete sentence about something the user gave: a config
value, a file, a name, a data set, an argument. Every such class of the zoo derives from it (`ConfigError`,
`UnknownPartError`, `CheckpointError`, `ReleasedCheckpointError`, `BenchmarkDataError`, `ImageError`,
`DataFileError`, `MissingWeightsError`, `UsageError`, the run directory's `RunDirError` and `DataSourceError`),
so the ``zoo`` command prints it on one line (``zoo train: error: <the sentence>``) and exits with its
``exit_code``, 2, while any other exception, a bug, keeps its traceback. Two more end a command the same way with
their own status: a failed write (`zoo.checkpoint.WriteError`, 1) and a run stopped by a signal
(`zoo.train.preemption.Interrupted`, 128 + the signal). Python callers catch the specific class (or `UserError` for
all of them).
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors in what the user gave; the message names the field, file, sample or tensor. The ``zoo``
    command ends with the message on one line and ``exit_code``; ``is_error`` False prints it without ``error:``
    (a report, not a mistake: a run stopped by a signal)."""

    exit_code = 2  # as argparse uses for bad arguments
    is_error = True


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message starts with the full path of the bad field. It lives here, below
    `zoo.moe` (which raises it for `MoEConfig`) and `zoo.config`; ``from zoo.config import ConfigError`` keeps
    working."""


class DataFileError(UserError, ValueError):
    """A data file that cannot be read at all (not JSON, not a shard); bad records in a readable file are counted
    skips instead."""


class MissingWeightsError(UserError, OSError):
    """A named pretrained part (tokenizer, LM, vision tower, hub checkpoint) that is neither a local directory nor
    in the offline cache."""


class UsageError(UserError, ValueError):
    """A command-line call that cannot be carried out as given (a missing argument, an impossible combination)."""


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user error, or None for an exception that is a bug.

    User errors are `UserError` s and OS errors about a named file (a missing file or folder, no permission, a
    directory where a file was expected): ``<file>: <what the system said>``. Line breaks in a message become
    ``; `` so the message stays one line.
    """
    if isinstance(error, UserError):
        message = str(error)
    elif isinstance(error, OSError) and error.filename is not None:
        message = f"{error.filename}: {error.strerror or error}"
    else:
        return None
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or type(error).__name__
