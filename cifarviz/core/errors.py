"""Errors that carry a message meant for people: what went wrong and how to fix it.

The CLI prints them without a traceback and the app shows them in a box; anything
else that escapes is a bug.
"""


class CifarvizError(Exception):
    """Base class: a problem with the user's input or environment, not with cifarviz."""


class DataError(CifarvizError):
    """The dataset could not be found, downloaded or read."""


class CheckpointError(CifarvizError):
    """A checkpoint file could not be read, or does not fit the architecture it names."""


class AmbiguousArchitectureError(CheckpointError):
    """A state dict's tensor names and shapes fit several zoo architectures; the caller must pick one.

    `candidates` lists the matching architecture names, for a picker in the app or the CLI's --arch."""

    def __init__(self, message: str, candidates: list[str]):
        super().__init__(message)
        self.candidates = list(candidates)

    def __reduce__(self):  # pickles (e.g. across processes) with its candidates
        return type(self), (str(self), self.candidates)


class ModelError(CifarvizError):
    """An unknown model name, bad model arguments, or unavailable pretrained weights."""


class TrainingError(CifarvizError):
    """Training stopped early because it could not go on (for example a non-finite loss)."""

    def __init__(self, message: str, history=None):
        super().__init__(message)
        self.history = history
