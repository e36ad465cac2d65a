"""nasfast.allocator: with the tuned thresholds a freed large tensor's memory is reused, not page-faulted
in again (measured by the process's own minor page-fault count, in a fresh interpreter each time)."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="glibc malloc tuning is Linux-only")

ROUNDS = 8
BLOCK_PAGES = 48 * 2**20 // 4096  # 4 KiB pages in one 48 MiB block
PROBE = f"ROUNDS = {ROUNDS}\n" + r"""
import resource, sys, torch
from nasfast.allocator import tune_malloc
tuned = tune_malloc()
n = 48 * 2**20 // 4  # a 48 MiB fp32 tensor: above glibc's largest dynamic mmap threshold (32 MiB)
for _ in range(2):
    torch.empty(n).fill_(1.0)  # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(ROUNDS):
    torch.empty(n).fill_(2.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(tuned, faults)
"""


def _probe(env_value: str) -> tuple[bool, int]:
    env = {**os.environ, "NASFAST_MALLOC_TUNE": env_value, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    tuned, faults = out.split()
    return tuned == "True", int(faults)


def test_tuned_malloc_reuses_large_blocks_instead_of_faulting_them_in_again():
    tuned, faults = _probe("1")
    assert tuned
    # fresh mmaps fault every page in every round; the heap reuses the block (an occasional round
    # faults it in again where glibc moved its top chunk)
    assert faults < ROUNDS * BLOCK_PAGES // 3, f"{faults} minor faults in {ROUNDS} reallocations of {BLOCK_PAGES} pages"


def test_nasfast_malloc_tune_0_leaves_glibc_defaults():
    tuned, faults = _probe("0")
    assert not tuned
    assert faults > ROUNDS * BLOCK_PAGES * 0.9  # the default: each 48 MiB block is a fresh mmap


def test_the_cli_applies_it():
    env = {**os.environ, "NASFAST_MALLOC_TUNE": "1"}
    check = "import nasfast.cli.app as a, nasfast.allocator as m\ntry:\n a.main(['--help'])\nexcept SystemExit: pass\nprint(m._APPLIED)"
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True).stdout
    assert "'ok': True" in out
