"""Compute kernels of gemma4-nb.

This folder is installed as ``gemma4_nb.kernels`` (see ``pyproject.toml``); it must never be
importable as a top-level ``kernels`` module, a name that belongs to Hugging Face's package.
Modules here import only relatively and from third-party libraries.

``torch_ops`` holds the plain PyTorch kernels every backend is checked against.
"""

from . import numba_cache

numba_cache.install()
