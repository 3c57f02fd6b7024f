"""blip3o_jax/hostmem.py: glibc keeps large freed blocks for the next call instead of unmapping them (XLA:CPU
allocates each execution's temporary buffer afresh), unless the user chose their own allocator settings."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 64 MiB blocks (above glibc's dynamic mmap threshold, at most 32 MiB), each written once then freed, 6 times;
# prints what keep_freed_memory did and the minor page faults of the rounds after the first
SCRIPT = textwrap.dedent("""
    import ctypes, resource, sys
    from blip3o_jax import hostmem
    what = hostmem.keep_freed_memory() if sys.argv[1] == "keep" else hostmem.state()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20

    def touch():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)

    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        touch()
    print(what, "|", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")

PAGES = (64 << 20) // 4096  # minor faults of one block when every page is new


def _run(mode, **env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "BLIP3O_MALLOC"} | env
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    what, faults = proc.stdout.strip().rsplit("|", 1)
    return what.strip(), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (Linux)")
def test_freed_blocks_are_kept_instead_of_unmapped():
    what, faults = _run("default")
    assert what == "unchanged (not requested)"
    assert faults > 4 * PAGES, faults  # glibc's default: each 64 MiB block is a fresh mmap, every page faults
    what, faults = _run("keep")
    assert what == "set"
    assert faults < PAGES // 4, faults  # the block is reused from the heap: its pages are already mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (Linux)")
def test_the_users_own_settings_win():
    for env, reason in (({"BLIP3O_MALLOC": "default"}, "BLIP3O_MALLOC=default"),
                        ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_* / GLIBC_TUNABLES"),
                        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "MALLOC_* / GLIBC_TUNABLES")):
        what, faults = _run("keep", **env)
        assert what.startswith("unchanged") and reason in what, what
        if "MALLOC_ARENA_MAX" in env or "BLIP3O_MALLOC" in env:
            assert faults > 4 * PAGES, faults  # glibc left as it is


def test_threshold_is_checked():
    from blip3o_jax import hostmem

    with pytest.raises(ValueError, match="threshold"):
        hostmem._decide(0)
