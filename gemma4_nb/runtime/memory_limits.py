"""How much memory this process may still take under its own limits, beyond what the machine has
free: the memory limit of its cgroup (a container, a Jupyter server's resource limits, a systemd
slice; cgroup v2 and v1) and its rlimits (``ulimit -v``: RLIMIT_AS; RLIMIT_DATA).

``/proc/meminfo`` sees the host: in a container limited to 4 GB on a 64 GB machine it reports
tens of GB free, and torch fails (or the kernel is OOM-killed) long after the planner said yes.
"""

from __future__ import annotations

import resource
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")  # where cgroupfs is mounted; tests point it at fake files
PROC_SELF = Path("/proc/self")
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= NO_LIMIT else value


def _reclaimable(stat: Path, keys: tuple[str, ...]) -> int:
    """Page cache the kernel drops before it fails an allocation (inactive file pages)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return 0
    fields = dict(line.split(maxsplit=1) for line in lines if len(line.split()) == 2)
    for key in keys:
        if key in fields and fields[key].strip().isdigit():
            return int(fields[key])
    return 0


def _own_paths(proc: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's memory controller."""
    v2 = v1 = None
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _levels(base: Path, rel: str | None) -> list[Path]:
    """The cgroup directory of this process and each ancestor up to ``base`` (all of them can
    limit it); only ``base`` when the path is not visible from here (a cgroup namespace)."""
    leaf = base / (rel or "/").lstrip("/")
    if not leaf.is_dir():
        return [base]
    levels = [leaf]
    while levels[-1] != base and base in levels[-1].parents:
        levels.append(levels[-1].parent)
    return levels


def cgroup_free(root: Path | None = None, proc: Path | None = None) -> int | None:
    """Bytes left under the tightest cgroup memory limit on this process, or None when there is
    no limit: ``memory.max - memory.current`` (v2) or ``memory.limit_in_bytes -
    memory.usage_in_bytes`` (v1), the inactive page cache counted as free, at every level."""
    root = Path(root or CGROUP_ROOT)
    proc = Path(proc or PROC_SELF)
    v2, v1 = _own_paths(proc)
    free = []
    unified = root / "unified" if (root / "unified").is_dir() else root  # v2 beside v1 (hybrid), or alone
    if v2 is not None or (unified / "memory.max").exists():
        for level in _levels(unified, v2):
            limit = _read_int(level / "memory.max")
            if limit is not None:
                used = _read_int(level / "memory.current") or 0
                used -= _reclaimable(level / "memory.stat", ("inactive_file",))
                free.append(limit - max(used, 0))
    memory = root / "memory"
    if memory.is_dir():
        for level in _levels(memory, v1):
            limit = _read_int(level / "memory.limit_in_bytes")
            if limit is not None:
                used = _read_int(level / "memory.usage_in_bytes") or 0
                used -= _reclaimable(level / "memory.stat", ("total_inactive_file", "inactive_file"))
                free.append(limit - max(used, 0))
    return max(min(free), 0) if free else None


def _status_bytes(proc: Path, field: str) -> int | None:
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rlimit_free(proc: Path | None = None) -> int | None:
    """Bytes left under the process's address-space and data rlimits, or None when unlimited:
    RLIMIT_AS less the mapped size (VmSize), RLIMIT_DATA less the data segment (VmData)."""
    proc = Path(proc or PROC_SELF)
    free = []
    for which, field in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(which)
        if soft == resource.RLIM_INFINITY or soft < 0:
            continue
        used = _status_bytes(proc, field) or 0
        free.append(max(soft - used, 0))
    return min(free) if free else None


def limits_free() -> int | None:
    """The smaller of :func:`cgroup_free` and :func:`rlimit_free`; None when neither limits."""
    found = [f for f in (cgroup_free(), rlimit_free()) if f is not None]
    return min(found) if found else None
