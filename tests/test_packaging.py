"""Layout rules: the kernels folder installs inside our namespace, never as `kernels`."""

from __future__ import annotations

import importlib.util


def test_no_top_level_kernels_module():
    spec = importlib.util.find_spec("kernels")
    assert spec is None, f"a top-level 'kernels' module is importable from {spec.origin}"


def test_kernels_live_inside_the_package():
    import gemma4_nb.kernels.torch_ops as ops

    assert ops.__name__ == "gemma4_nb.kernels.torch_ops"


def test_transformers_does_not_see_a_kernels_package():
    from transformers.utils import import_utils

    assert not import_utils.is_kernels_available()
