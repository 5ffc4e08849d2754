"""numba's on-disk cache, keyed on every kernel source of this folder.

numba checks a cached function against its own source file only (a hash of its content in numba
0.68, its modification time before). The kernels here also compile code they import: the vector
intrinsics of :mod:`.simd`, the helpers of :mod:`.cpu_numba` that :mod:`.cpu_decode` inlines. A
change there would leave the machine code of an unchanged file stale after an upgrade. So every
cached function defined in this folder is stamped with one hash of all its ``.py`` files: any
change recompiles them all once. Functions elsewhere keep numba's own locators.

:func:`install` must run before the first ``@njit(cache=True)`` of this folder is decorated
(``kernels/__init__.py`` calls it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def sources_stamp(folder: Path = HERE) -> str:
    """SHA-256 of every ``.py`` file of ``folder`` (names and contents, in name order)."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _inside(py_file: str, folder: Path) -> bool:
    try:
        return Path(py_file).resolve().parent == folder
    except OSError:
        return False


def install(folder: Path = HERE) -> bool:
    """Put stamped copies of numba's locators first, for the functions defined in ``folder``;
    False where this numba version has none of the expected classes (its own locators then stay
    in charge)."""
    from numba.core import caching

    folder = Path(folder).resolve()
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if impl is None or any(getattr(c, "_stamped_folder", None) == folder for c in impl._locator_classes):
        return impl is not None
    stamp = sources_stamp(folder)

    def stamped(base):
        def from_function(cls, py_func, py_file):
            return base.from_function.__func__(cls, py_func, py_file) if _inside(py_file, folder) else None

        return type(f"KernelSources{base.__name__}", (base,), {
            "_stamped_folder": folder,
            "get_source_stamp": lambda self: stamp,
            "from_function": classmethod(from_function),
        })

    ours = [stamped(c) for c in impl._locator_classes
            if hasattr(c, "get_source_stamp") and getattr(c, "_stamped_folder", None) is None]
    impl._locator_classes[:0] = ours
    return True
