"""The free-memory probe honours the process's own limits: its cgroup (v2 and v1, read from fake
cgroup files here) and its rlimits (a real ``resource.setrlimit`` in a subprocess), so the memory
planner refuses with numbers instead of torch failing later."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gemma4_nb.runtime import memory, memory_limits
from gemma4_nb.runtime.memory_limits import cgroup_free

GiB, MiB = 1 << 30, 1 << 20


def fake_proc(tmp_path, cgroup_lines: str):
    proc = tmp_path / "proc"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup_lines)
    (proc / "status").write_text("VmSize:\t1000 kB\nVmData:\t500 kB\n")
    return proc


def write(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(str(text))


def test_cgroup_v2_limit_less_usage_with_page_cache_counted_free(tmp_path):
    root = tmp_path / "cgroup"
    write(root, cgroup__controllers="memory cpu")
    write(root / "user.slice" / "jupyter", memory__max=2 * GiB, memory__current=int(1.5 * GiB),
          memory__stat=f"anon 1000\nfile 999\ninactive_file {256 * MiB}\nactive_file 0\n")
    proc = fake_proc(tmp_path, "0::/user.slice/jupyter\n")
    assert cgroup_free(root, proc) == 2 * GiB - (int(1.5 * GiB) - 256 * MiB)


def test_cgroup_v2_the_tightest_level_wins(tmp_path):
    root = tmp_path / "cgroup"
    write(root / "user.slice", memory__max=GiB, memory__current=900 * MiB)
    write(root / "user.slice" / "jupyter", memory__max=8 * GiB, memory__current=100 * MiB)
    proc = fake_proc(tmp_path, "0::/user.slice/jupyter\n")
    assert cgroup_free(root, proc) == 124 * MiB


def test_cgroup_v2_without_a_limit_or_files(tmp_path):
    root = tmp_path / "cgroup"
    write(root / "user.slice", memory__max="max", memory__current=5 * GiB)
    assert cgroup_free(root, fake_proc(tmp_path, "0::/user.slice\n")) is None
    assert cgroup_free(tmp_path / "nothing", tmp_path / "no-proc") is None


def test_cgroup_v2_in_a_namespace_reads_the_root(tmp_path):
    """In a container with its own cgroup namespace the path is "/" (or not visible): the limit
    sits on the mount's root."""
    root = tmp_path / "cgroup"
    write(root, memory__max=3 * GiB, memory__current=GiB)
    assert cgroup_free(root, fake_proc(tmp_path, "0::/\n")) == 2 * GiB
    assert cgroup_free(root, fake_proc(tmp_path / "b", "0::/docker/abc\n")) == 2 * GiB


def test_cgroup_v1_memory_controller(tmp_path):
    root = tmp_path / "cgroup"
    write(root / "memory", memory__limit_in_bytes=9223372036854771712, memory__usage_in_bytes=20 * GiB)
    write(root / "memory" / "process_api" / "x", memory__limit_in_bytes=4 * GiB, memory__usage_in_bytes=3 * GiB,
          memory__stat=f"cache 5\ninactive_file {GiB // 2}\ntotal_inactive_file {GiB}\n")
    proc = fake_proc(tmp_path, "4:memory:/process_api/x\n1:cpu:/\n0::/\n")
    assert cgroup_free(root, proc) == 4 * GiB - (3 * GiB - GiB)  # the hierarchy's total counts


def test_cgroup_v1_unlimited_is_no_limit(tmp_path):
    root = tmp_path / "cgroup"
    write(root / "memory", memory__limit_in_bytes=9223372036854771712, memory__usage_in_bytes=20 * GiB)
    assert cgroup_free(root, fake_proc(tmp_path, "4:memory:/\n")) is None


def test_the_probe_takes_the_smallest(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    write(root, memory__max=512 * MiB, memory__current=0)
    monkeypatch.setattr(memory_limits, "CGROUP_ROOT", root)
    monkeypatch.setattr(memory_limits, "PROC_SELF", fake_proc(tmp_path, "0::/\n"))
    assert memory.available_memory("cpu") == 512 * MiB
    write(root, memory__max=1 << 55)  # a limit above the host's free memory: MemAvailable wins
    assert 0 < memory.available_memory("cpu") < 1 << 55


PROBE = """
import resource, sys
from gemma4_nb.runtime.memory import available_memory
from gemma4_nb.runtime.memory_limits import _status_bytes, PROC_SELF
which, field = getattr(resource, sys.argv[1]), sys.argv[2]
headroom = int(sys.argv[3])
resource.setrlimit(which, (_status_bytes(PROC_SELF, field) + headroom, resource.RLIM_INFINITY))
print(available_memory("cpu"))
"""


@pytest.mark.parametrize("which,field", [("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")])
def test_a_real_rlimit_in_a_subprocess(which, field):
    out = subprocess.run([sys.executable, "-c", PROBE, which, field, str(GiB)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    seen = int(out.stdout.split()[-1])
    assert GiB - 64 * MiB < seen <= GiB, seen / GiB  # the headroom, less what the probe itself mapped


REFUSE = """
import resource, sys
import gemma4_nb
from gemma4_nb.runtime.memory_limits import _status_bytes, PROC_SELF
resource.setrlimit(resource.RLIMIT_AS, (_status_bytes(PROC_SELF, "VmSize") + 300 * 2**20, resource.RLIM_INFINITY))
try:
    gemma4_nb.load(progress=False, quant=sys.argv[1] if len(sys.argv) > 1 else None)
except gemma4_nb.Gemma4Error as exc:
    print("REFUSED", type(exc).__name__, exc)
"""


def refused(cache, *args) -> str:
    import os

    env = dict(os.environ, GEMMA4_NB_CACHE=str(cache))
    env.pop("GEMMA4_NB_MODEL", None)
    out = subprocess.run([sys.executable, "-c", REFUSE, *args], capture_output=True, text=True, timeout=600, env=env)
    assert "REFUSED MemoryPlanError" in out.stdout, out.stdout + out.stderr[-2000:]
    return out.stdout


def test_the_planner_refuses_under_an_address_space_limit(conversion_cache):
    """Under ``ulimit -v`` the embedded model's weights (0.5 GiB in bf16) do not fit in the 300 MiB
    left: a MemoryPlanError with the numbers, not a torch allocation failure."""
    from gemma4_nb.runtime.gguf_file import prepare_gguf
    from gemma4_nb.runtime.resolve import embedded_model

    prepare_gguf(embedded_model(), plain=True, progress=False)  # its metadata read beforehand, without the limit
    out = refused(conversion_cache, "bf16")
    assert "weights need 0.5 GiB in bf16 but only 0.2 GiB is available on cpu" in out or \
        "weights need 0.5 GiB in bf16 but only 0.3 GiB is available on cpu" in out, out


def test_a_conversion_that_cannot_fit_is_refused(tmp_path):
    """The repack holds one block of rows and the tokenizer's vocabulary (0.4 GiB for the 270M's
    262,144 tokens): under the limit it is refused before anything is written."""
    out = refused(tmp_path / "fresh-cache")  # the GGUF is repacked under the limit
    assert "reading it needs about 0.4 GiB of memory" in out and "GiB is available" in out, out
    assert not list((tmp_path / "fresh-cache" / "gguf").glob("*/config.json"))
