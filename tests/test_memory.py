"""Holding freed memory (catnet.utils.memory): what it changes, when it stays out of the way, and which
`catnet <verb>` processes get it. The allocator setting is process-wide, so each case runs in a
child process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import catnet.cli
from catnet.utils.memory import glibc

# Page faults per round of a classifier-sized backward (its 105 MB weight gradient is above glibc's
# largest mmap threshold, so by default it is mapped and unmapped every round); prints "HELD FAULTS".
CHILD = """
import resource, torch
from catnet.utils.memory import hold_freed_memory
held = hold_freed_memory() if {hold} else False
w, x = torch.randn(400, 65536, requires_grad=True), torch.randn(64, 65536)
def one_round():
    (x @ w.t()).logsumexp(1).sum().backward()
    w.grad = None
for _ in range(3):
    one_round()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_round()
print(held, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 10)
"""

GLIBC = glibc() is not None


def child(hold: bool, **env: str) -> tuple[bool, int]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CATNET_MALLOC"}
    out = subprocess.run([sys.executable, "-c", CHILD.format(hold=hold)], env={**base, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere hold_freed_memory() is a no-op")
def test_held_memory_is_reused_without_page_faults():
    held, faults = child(True)
    _, default_faults = child(False)
    assert held
    # the gradient is 25,600 pages
    assert default_faults > 20000
    assert faults < default_faults / 5


@pytest.mark.parametrize("env", [{"CATNET_MALLOC": "system"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"MALLOC_ARENA_MAX": "2"}])
def test_user_choice_leaves_the_allocator_alone(env):
    held, faults = child(True, **env)
    assert not held
    if GLIBC:
        assert faults > 20000


@pytest.mark.parametrize("verb, holds", [("train", True), ("predict", True), ("extract", False)])
def test_which_verbs_hold_freed_memory(monkeypatch, tmp_path, verb, holds):
    calls = []
    monkeypatch.setattr(catnet.cli, "hold_freed_memory", lambda: calls.append(verb) or True)
    out = [] if verb == "predict" else ["--out", str(tmp_path / "o")]
    assert catnet.cli.main([verb, str(tmp_path / "missing"), *out]) != 0  # fails after the hold
    assert calls == ([verb] if holds else [])
