"""Shared fixtures. Tests never need ../shared; those that use its real clips run when it exists."""

from __future__ import annotations

import os
import signal
from pathlib import Path

# Spinning OpenMP threads make tests many times slower when processes share the 2 cores (torchrun tests,
# DataLoader workers); passive waiting costs nothing when the machine is idle. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def sigint_handled():
    """Ctrl-C raises KeyboardInterrupt during the test, and in the processes it starts, also when the suite
    itself inherited SIGINT ignored (a background job, nohup): Python then leaves it ignored, so
    `_thread.interrupt_main()` does nothing and child processes ignore a SIGINT too."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared, or skip: it is optional for the test suite."""
    if not (SHARED / "data" / "clips").is_dir():
        pytest.skip("../shared/data/clips not present")
    return SHARED


@pytest.fixture(scope="session")
def pretrained_i3d() -> Path:
    """Path of the converted Kinetics-400 Inception-I3D weights.

    Missing weights skip the test on a developer machine that never ran `make setup`, but fail it in CI,
    where `make test` has just fetched them.
    """
    from catnet.backbones.i3d_inception_weights import converted_weights_path

    path = converted_weights_path()
    if not path.is_file():
        msg = f"pretrained Inception-I3D weights not found at {path}; run `catnet weights fetch`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def make_video(tmp_path):
    """Factory: encode a small moving-square video and return its path."""
    from catnet.video.encode import write_video

    def _make(name="v.mp4", frames=40, height=64, width=96, fps=25.0, codec="libx264", seed=0):
        rng = np.random.default_rng(seed)
        t = np.arange(frames)
        video = np.zeros((frames, height, width, 3), np.uint8)
        video[:] = rng.integers(0, 60, size=3, dtype=np.uint8)
        for i in t:
            x = int((i * 3) % max(1, width - 10))
            video[i, height // 3: height // 3 + 10, x: x + 10] = (250, 200, 40)
        return write_video(tmp_path / name, video, fps=fps, codec=codec)

    return _make


@pytest.fixture
def one_thread():
    """One intra-op thread for tests that run several torch processes at once (extraction workers,
    torchrun ranks, killed children): on 2 cores, extra OpenMP threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
