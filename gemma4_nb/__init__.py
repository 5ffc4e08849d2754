"""gemma4-nb: a local Gemma 4 copilot that runs inside the Jupyter kernel."""

__version__ = "0.1.0"

from .errors import Gemma4Error
from .runtime import Model, load

__all__ = ["Gemma4Error", "Model", "load"]


def load_ipython_extension(ipython):
    """``%load_ext gemma4_nb``: registers ``%%gemma`` and ``%gemma``."""
    from .magics import load_ipython_extension as _load

    _load(ipython)
