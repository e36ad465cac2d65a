"""nasfast.allocator: with the tuned thresholds a large tensor is served from malloc's heap, not by a
fresh mmap (which the kernel page-faults in anew on every allocation). Observed through glibc's own
accounting (mallinfo2's bytes in mmapped blocks), in a fresh interpreter each time."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc tuning: Linux with glibc only")

PROBE = r"""
import ctypes, torch
from nasfast.allocator import tune_malloc


class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = tune_malloc()
n = 48 * 2**20 // 4  # a 48 MiB fp32 tensor: above glibc's largest dynamic mmap threshold (32 MiB)
grown = []
for _ in range(4):
    before = libc.mallinfo2().hblkhd
    x = torch.empty(n).fill_(1.0)
    grown.append(libc.mallinfo2().hblkhd - before)  # bytes newly held in mmapped blocks
    del x
print(tuned, min(grown), max(grown))
"""


def _probe(env_value: str) -> tuple[bool, int, int]:
    env = {**os.environ, "NASFAST_MALLOC_TUNE": env_value}
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    if "mallinfo2" in r.stderr:
        pytest.skip("glibc without mallinfo2 (< 2.33)")
    assert r.returncode == 0, r.stderr[-2000:]
    tuned, low, high = r.stdout.split()
    return tuned == "True", int(low), int(high)


@pytest.mark.slow
def test_tuned_malloc_serves_large_tensors_from_the_heap():
    tuned, low, high = _probe("1")
    assert tuned
    assert high == 0, f"a 48 MiB tensor still took {high} bytes of fresh mmap"


@pytest.mark.slow
def test_nasfast_malloc_tune_0_leaves_glibc_defaults():
    tuned, low, high = _probe("0")
    assert not tuned
    assert low >= 48 * 2**20  # the default: every 48 MiB tensor is a fresh mmap


@pytest.mark.slow
def test_the_cli_applies_it():
    env = {**os.environ, "NASFAST_MALLOC_TUNE": "1"}
    check = "import nasfast.cli.app as a, nasfast.allocator as m\ntry:\n a.main(['--help'])\nexcept SystemExit: pass\nprint(m._APPLIED)"
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True).stdout
    assert "'ok': True" in out
