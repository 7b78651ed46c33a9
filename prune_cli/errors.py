"""Errors that map onto the shell contract: exit 2 for usage/recipe problems, 1 for runtime failures."""

from __future__ import annotations


class PruneCliError(Exception):
    """Base class. `problems` holds one line per problem; the CLI prints each on its own line."""

    exit_code = 1

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class UsageError(PruneCliError):
    """Bad recipe, bad override, bad flag value: the user must change the command."""

    exit_code = 2


class DataError(PruneCliError):
    """Missing/corrupt audio, bad manifest lines, empty transcripts."""


class MissingInputError(PruneCliError):
    """A stage's inputs are absent; the message names the command that produces them."""


class CheckpointError(PruneCliError):
    """Unreadable or mismatched checkpoint / mask file."""


class DiskFullError(PruneCliError):
    """A write ran out of space; the message names the file. Nothing written before is lost (writes are atomic)."""


class WriteError(PruneCliError):
    """A file cannot be written where it was asked to go; the message names it and says why."""


class RunDirInUse(PruneCliError):
    """Another process owns the run dir."""


class TrainingError(PruneCliError):
    """Training diverged (a non-finite loss): nothing is saved and the stage is not marked complete."""


def first_few(items: list[str], n: int = 3, sep: str = "; ") -> str:
    """The first n of a list of problems or names for a one-line message, and how many more there are."""
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
