"""gemma4-nb: a local Gemma 4 copilot that runs inside the Jupyter kernel."""

__version__ = "0.1.0"

from .errors import Gemma4Error
from .runtime.model import Model, load

__all__ = ["Gemma4Error", "Model", "chat", "load"]


def chat():
    """A chat panel (ipywidgets) for this kernel: send, stop, attachments, insert/run code."""
    from .notebook.panel import chat as _chat

    return _chat()


def load_ipython_extension(ipython):
    """``%load_ext gemma4_nb``: registers ``%%gemma`` and ``%gemma``."""
    from .notebook.magics import load_ipython_extension as _load

    _load(ipython)
