"""The errors lmlab raises for user mistakes.

Every exception a user can cause by what they typed or pointed at (a missing file, an unknown model
name, a datastore built with another model, a malformed licence file) is an :class:`LmlabError`
subclass whose message says what to do. The CLI prints the message on one line and exits 2
(:func:`lmlab.cli.main`); library callers catch the class they care about.
"""

from __future__ import annotations


class LmlabError(Exception):
    """Base class: a user-facing error whose message is one actionable line."""

    exit_code = 2


class MissingDependencyError(LmlabError):
    """An optional package (a model wheel, an extra) is not installed; the message names the pip command."""

    def __init__(self, what: str, install: str):
        super().__init__(f"{what} is not installed: run `{install}`")
        self.install = install


class ConfigError(LmlabError):
    """An invalid option value or combination of options."""


class ModelNotFoundError(LmlabError):
    """A model spec that is neither a known name, a tiny preset, nor a local Hugging Face folder."""


class DataError(LmlabError):
    """Input data is missing, empty or malformed."""


class ManifestMismatchError(LmlabError):
    """A built artefact (checkpoint, datastore, index) does not match what it is being used with."""


class CheckpointError(LmlabError):
    """A checkpoint folder is missing, incomplete or from an incompatible run."""


class BackendError(LmlabError):
    """A text-generation backend (local model or HTTP endpoint) could not serve a request."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error that
    wraps a library's multi-line one (transformers, safetensors, torch.load)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if limit is None else line[:limit]
