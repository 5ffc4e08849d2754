"""Errors a user can act on.

Every exception raised for bad input derives from :class:`Gemma4Error`; its message names the
problem and what to do. The CLI prints the message alone (no traceback) and the notebook magics
show it as a short error, keeping the kernel alive.
"""


class Gemma4Error(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(Gemma4Error):
    """``config.json`` is missing, malformed, or describes an unsupported architecture."""


class CheckpointError(Gemma4Error):
    """Weights are missing, corrupt, truncated or mis-shaped."""


class ModelNotFoundError(Gemma4Error):
    """A model path or repo id could not be resolved to files on disk."""


class TokenizerError(Gemma4Error):
    """Tokenizer files or the chat template are missing or invalid."""


class PromptError(Gemma4Error):
    """The prompt or messages are empty, malformed, or too long for the context."""


class ContextLengthError(PromptError):
    """The prompt (plus the requested generation) does not fit the configured context."""
