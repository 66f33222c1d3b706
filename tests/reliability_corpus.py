"""Generators for the reliability suite: a corpus of bad videos, and a kill-point runner for the figures.

Every case is cheap (tiny frames, a few encoded frames); `make_corpus(folder)` writes them all and
returns `Case`s saying what each one is and what a robust pipeline must do with it:

    expect="skip"  the video is unusable: extraction records it as failed with a reason, predict prints
                   a one-line error for it, and every other video still goes through;
    expect="ok"    an awkward but valid video (1 frame, huge timestamps, ...): it must be processed;
    expect="any"   either is acceptable (e.g. corrupt packets the decoder may conceal), never a crash.

Run as a script for the figures in docs/reliability.md (inputs tried / handled, kill points survived):

    python tests/reliability_corpus.py videos          # corpus through probe, extract and predict
    python tests/reliability_corpus.py kills --points 8
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

GOOD_FRAMES = 24


@dataclass
class Case:
    name: str  # file name inside the corpus folder (also the video id)
    what: str  # one line for the report
    expect: str  # "skip", "ok" or "any" (see the module docstring)
    reason: str = ""  # a substring the skip reason must contain ("" = any reason)
    unreadable: bool = False  # must be made unreadable by the caller (see `deny_access`)


def moving_square(frames: int, height: int = 32, width: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    video = np.empty((frames, height, width, 3), np.uint8)
    video[:] = rng.integers(0, 80, size=3, dtype=np.uint8)
    for i in range(frames):
        x = (i * 3) % max(1, width - 8)
        video[i, height // 4: height // 4 + 8, x: x + 8] = (250, 200, 40)
    return video


def encode(path: Path, frames: np.ndarray, fps: float = 25.0, codec: str = "libx264",
           pts: list[int] | None = None, container_options: dict[str, str] | None = None,
           time_base: Fraction | None = None) -> Path:
    """Like catnet.video.encode.write_video, plus container options (faststart) and raw timestamps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    with av.open(str(path), mode="w", options=container_options or {}) as c:
        rate = Fraction(fps).limit_denominator(1000)
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            s.options = {"preset": "ultrafast"}
        tb = time_base or 1 / rate
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = int(pts[i]), tb
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    return path


def _mdat_range(data: bytes) -> tuple[int, int]:
    """Byte range of an mp4's media data (the top-level `mdat` box)."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos: pos + 4], "big")
        kind = data[pos + 4: pos + 8]
        if size == 1:
            size = int.from_bytes(data[pos + 8: pos + 16], "big")
        if kind == b"mdat":
            return pos + 8, pos + size
        if size < 8:
            break
        pos += size
    raise ValueError("no mdat box")


def make_corpus(root: str | os.PathLike, good: int = 2) -> list[Case]:
    """Write the bad-video corpus (plus `good` normal videos named good*.mp4) into `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, what: str, expect: str, reason: str = "", **kw) -> Path:
        cases.append(Case(name, what, expect, reason, **kw))
        return root / name

    for i in range(good):
        encode(add(f"good{i}.mp4", "normal 24-frame H.264 mp4", "ok"), moving_square(GOOD_FRAMES, seed=i))

    add("empty.mp4", "0-byte file", "skip", "0 bytes").write_bytes(b"")
    add("text.mp4", "text file renamed .mp4", "skip", "cannot open").write_text("just some notes\n" * 20)
    add("random.mp4", "random bytes named .mp4", "skip").write_bytes(
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    # moov at the end (the default): any cut loses the index -> cannot open
    full = encode(root / "_full.mp4", moving_square(GOOD_FRAMES, seed=5)).read_bytes()
    for frac in (0.02, 0.3, 0.6, 0.95):
        add(f"cut{int(frac * 100):02d}.mp4", f"mp4 truncated at {frac:.0%} (index at the end)", "skip"
            ).write_bytes(full[: int(len(full) * frac)])
    # faststart (moov first): a cut keeps the index, which promises frames that are no longer there
    fast = encode(root / "_fast.mp4", moving_square(GOOD_FRAMES, seed=6),
                  container_options={"movflags": "faststart"}).read_bytes()
    start, end = _mdat_range(fast)
    for frac in (0.1, 0.5):
        add(f"fastcut{int(frac * 100):02d}.mp4", f"faststart mp4 cut at {frac:.0%} of its frames", "skip"
            ).write_bytes(fast[: start + int((end - start) * frac)])
    # garbage over the middle of the media data: the decoder may conceal it (then it is processed)
    data = bytearray(full)
    start, end = _mdat_range(full)
    mid = (start + end) // 2
    data[mid: mid + (end - start) // 4] = np.random.default_rng(1).integers(
        0, 256, (end - start) // 4, dtype=np.uint8).tobytes()
    add("corrupt_middle.mp4", "random bytes over the middle quarter of the packets", "any").write_bytes(data)
    # the codec tag rewritten to one no decoder knows
    add("unknown_codec.mp4", "mp4 whose codec tag no decoder knows", "skip").write_bytes(
        full.replace(b"avc1", b"qqqq").replace(b"avcC", b"qqqC"))
    (root / "_full.mp4").unlink()
    (root / "_fast.mp4").unlink()

    encode(add("one_frame.mp4", "1-frame video", "ok"), moving_square(1))
    audio_only(add("audio_only.mp4", "audio-only mp4 (AAC)", "skip", "no video stream"))
    # huge frames, but flat ones: cheap to encode, and 2 frames keep the decode bounded
    big = np.full((2, 2160, 3840, 3), 90, np.uint8)
    encode(add("huge_4k.mp4", "3840x2160 (4K UHD) frames", "ok"), big)
    # a long video made cheap: 4 x 4 pixels at 1 fps for an hour, and two frames ten hours apart
    encode(add("long_1h.mkv", "1-hour video, 4x4 px at 1 fps (3600 frames)", "ok"),
           np.repeat(moving_square(1, 16, 16), 3600, axis=0), fps=1.0)
    encode(add("huge_pts.mp4", "3 frames with timestamps 0 s, 5 h, 10 h", "ok"), moving_square(3),
           pts=[0, 5 * 3600, 10 * 3600], time_base=Fraction(1, 1), fps=25.0)

    add("unreadable.mp4", "no read permission", "skip", "permission denied", unreadable=True)
    shutil.copy(root / "good0.mp4", root / "unreadable.mp4")
    add("folder.mp4", "directory named like a video", "skip", "directory").mkdir(exist_ok=True)
    fifo = add("pipe.mp4", "named pipe (FIFO) named like a video", "skip", "not a regular file")
    if hasattr(os, "mkfifo") and not fifo.exists():
        os.mkfifo(fifo)
    add("dangling.mp4", "symlink to a file that does not exist", "skip", "no such file").symlink_to(
        root / "does-not-exist.mp4")
    add("missing.mp4", "listed but absent", "skip", "no such file")
    return cases


def deny_access(cases: list[Case], root: Path, monkeypatch=None) -> str:
    """Make the `unreadable` cases unreadable. As root, chmod 000 still reads, so then (and only then)
    catnet's access check is told the truth a normal user would get (via `monkeypatch` when given).

    Returns how it was done, for the report."""
    paths = {str(root / c.name) for c in cases if c.unreadable}
    for p in paths:
        os.chmod(p, 0)
    if os.geteuid() != 0:
        return "chmod 000"
    import catnet.video.decode as decode

    real = decode.os.access

    def access(p, mode):
        return str(p) not in paths and real(p, mode)

    if monkeypatch is not None:
        monkeypatch.setattr(decode.os, "access", access)
    else:  # the figures script: for the rest of the process
        decode.os.access = access
    return "chmod 000 + os.access patched (root can read mode-000 files)"


def write_annotations(cases: list[Case], root: Path, csv_path: Path) -> Path:
    """A plain path,label CSV listing every case (so even a directory or a missing file gets a reason)."""
    lines = ["path,label"] + [f"{c.name},{'a' if i % 2 else 'b'}" for i, c in enumerate(cases)]
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def restore_access(root: Path) -> None:
    for p in Path(root).iterdir():
        if p.is_file() and not p.is_symlink() and not stat.S_IMODE(p.stat().st_mode):
            os.chmod(p, 0o644)


# ------------------------------------------------------------------------------------ kill -9 points

REPO = Path(__file__).resolve().parents[1]
# the default --shard-size (16): finished videos are journaled, so a kill must cost only the one in flight
EXTRACT_TINY = ["--backbone", "i3d_inception", "--no-pretrained", "--clips", "2", "--frames", "4",
                "--stride", "2", "--crops", "1", "--short-side", "32", "--crop-size", "32", "--batch", "2",
                "--workers", "0", "--no-progress"]

# Runs `catnet` in a child that logs, fsynced, each unit of work as it starts (a video's decode, a training
# epoch): after a kill, started-but-not-saved = work the resume redoes.
CHILD = """
import os, sys, time
import torch
torch.set_num_threads(1)
log, pace = open(sys.argv[1], "a"), float(sys.argv[2])
def note(what):
    log.write(what + "\\n"); log.flush(); os.fsync(log.fileno())
    time.sleep(pace)  # stretches each unit so a kill lands inside it on a fast machine too
import catnet.features.extract as extract
getitem = extract._ClipDataset.__getitem__
def logged_getitem(self, i):
    note(f"video {self.entries[i].id}")
    return getitem(self, i)
extract._ClipDataset.__getitem__ = logged_getitem
import catnet.utils.distributed as dist
order = dist.TrainSampler.epoch_order
def logged_order(self):
    note("epoch")
    return order(self)
dist.TrainSampler.epoch_order = logged_order
from catnet.cli import main
raise SystemExit(main(sys.argv[3:]))
"""


@dataclass
class Kill:
    at: str  # what had been saved when the kill landed
    killed: bool  # False: the run finished before the kill landed
    redone: int  # units of work started before the kill and not saved (redone by the resume)


def _started(log: Path) -> list[str]:
    try:
        return log.read_text().splitlines()
    except FileNotFoundError:
        return []


def run_and_kill(argv: list[str], log: Path, units: int, delay: float, pace: float = 0.0,
                 timeout: float = 300) -> bool:
    """Start `catnet argv` (logging into `log`, each unit of work `pace` s longer), wait until it has
    started `units` units of work (videos, epochs) then `delay` more seconds, and SIGKILL it.

    Returns whether it was killed (False if it finished first)."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(log), str(pace), *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and len(_started(log)) < units:
            if time.monotonic() > deadline:
                raise TimeoutError(f"catnet {argv[0]} never reached the kill point")
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None and time.monotonic() > deadline:
            proc.kill()
        _, err = proc.communicate(timeout=120)
    if proc.returncode not in (-signal.SIGKILL, 0, 1):
        raise RuntimeError(f"catnet {argv[0]} failed on its own ({proc.returncode}): {err.decode()[-800:]}")
    return proc.returncode == -signal.SIGKILL


def stored_ids(store: Path) -> list[str]:
    """Ids in the store's shards, one per shard entry (duplicates kept), each shard fully read, then the
    valid records of the writers' journals not yet in a shard (what a resume keeps without redoing)."""
    from safetensors.numpy import load_file

    from catnet.features.store import JOURNAL_SUFFIX, read_journal, read_shard_videos

    ids = []
    for shard in sorted((store / "shards").glob("*.safetensors")):
        tensors = load_file(str(shard))  # raises on a torn or corrupt shard
        if not np.isfinite(tensors["features"].astype(np.float32)).all():
            raise ValueError(f"{shard.name}: non-finite features")
        ids += [r["id"] for r in read_shard_videos(shard)]
    in_shards = set(ids)
    for journal in sorted((store / "shards").glob("*" + JOURNAL_SUFFIX)):
        ids += [r["id"] for r, _, _ in read_journal(journal)[0] if r["id"] not in in_shards]
    return ids


def kill_extraction(src: Path, store: Path, log: Path, units: int, delay: float, pace: float = 0.0) -> Kill:
    """One kill of `catnet extract src --out store`, `delay` s after it starts its `units`-th video."""
    before = set(stored_ids(store)) if (store / "shards").is_dir() else set()
    log.write_text("")
    killed = run_and_kill(["extract", str(src), "--out", str(store), *EXTRACT_TINY], log, units, delay, pace)
    from catnet.features.store import done_and_failed

    started = {line.split(" ", 1)[1] for line in _started(log)}
    saved = set(stored_ids(store))
    failed = done_and_failed(store)[1]  # recorded as failed: not retried, so not redone either
    return Kill(f"{len(saved)} videos stored", killed, len(started - saved - failed - before))


def kill_training(store: Path, run: Path, log: Path, train_args: list[str], units: int, delay: float,
                  pace: float = 0.0) -> Kill:
    """One kill of `catnet train` (resuming if `run` has a checkpoint), `delay` s after it starts its
    `units`-th epoch."""
    import torch

    last = run / "checkpoints" / "last.pt"
    resume = ["--resume"] if last.is_file() else []
    start = torch.load(last, weights_only=True)["epoch"] if last.is_file() else 0
    log.write_text("")
    argv = ["train", str(store), "--out", str(run), *train_args, *resume]
    killed = run_and_kill(argv, log, units, delay, pace)
    saved = torch.load(last, weights_only=True)["epoch"] if last.is_file() else 0  # torn file: raises
    return Kill(f"epoch {saved} saved", killed, start + len(_started(log)) - saved)


# ------------------------------------------------------------------------------------------- figures


def _videos_figures(work: Path) -> None:
    """The corpus through load_clips, `catnet extract` and `catnet predict` (in-process, so the
    unreadable case can be simulated as root too): inputs tried / handled."""
    import contextlib
    import io
    import json

    from catnet.cli import main
    from catnet.errors import CatnetError
    from catnet.video import ClipSampling, SpatialConfig, load_clips

    root = work / "corpus"
    cases = make_corpus(root)
    how = deny_access(cases, root)
    print(f"corpus: {len(cases)} inputs; unreadable file: {how}")
    handled = 0
    for c in cases:
        try:
            load_clips(root / c.name, ClipSampling(2, 4, 2), SpatialConfig(32, 32, 1))
            got, why = "ok", ""
        except CatnetError as e:
            got, why = "skip", str(e)
        except Exception as e:  # noqa: BLE001 - counted as not handled
            got, why = "CRASH", f"{type(e).__name__}: {e}"
        good = got != "CRASH" and (c.expect in ("any", got))
        handled += good
        print(f"| `{c.name}` | {c.what} | {c.expect} | {got} | {why.replace(str(root) + '/', '')[:70]} |")
    print(f"load_clips: {handled}/{len(cases)} handled as expected")

    listing = write_annotations(cases, root, root / "all.csv")
    tiny = ["--backbone", "i3d_r50", "--no-pretrained", "--clips", "2", "--frames", "4", "--stride", "2",
            "--crops", "1", "--short-side", "32", "--crop-size", "32", "--workers", "0", "--no-progress"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["extract", str(listing), "--out", str(work / "store"), *tiny, "--json"])
    print(f"catnet extract: exit {code}, {out.getvalue().strip()}; "
          f"traceback: {'Traceback' in err.getvalue()}")
    with contextlib.redirect_stderr(io.StringIO()):
        main(["train", str(work / "store"), "--out", str(work / "run"), "--epochs", "1", "--batch-size", "2",
              "--val-split", "none", "--head-opt", "num_heads=2", "--no-progress"])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["predict", *[str(root / c.name) for c in cases], "--checkpoint", str(work / "run"),
                     "--json"])
    errors = [ln for ln in err.getvalue().splitlines() if ln.startswith("catnet predict: error:")]
    predicted = [json.loads(ln)["video"] for ln in out.getvalue().splitlines()]
    print(f"catnet predict: exit {code}, {len(predicted)} predicted, {len(errors)} one-line errors, "
          f"traceback: {'Traceback' in err.getvalue()}; {err.getvalue().strip().splitlines()[-1]}")
    restore_access(root)


def _kill_figures(work: Path, points: int, seed: int) -> None:
    import csv
    import random

    from catnet.features import FeatureStore
    from catnet.video.encode import write_video

    rng = random.Random(seed)
    n = 3 * points
    src = work / "videos"
    for i in range(n):
        write_video(src / f"c{i % 2}" / f"v{i}.mp4", moving_square(10 + i, seed=i))
    store, log = work / "store", work / "log"
    kills = []
    for _ in range(points):
        k = kill_extraction(src, store, log, rng.randint(1, 2), rng.uniform(0, 0.15))
        kills.append(k)
        print(f"  extract kill: {k}")
    from catnet.cli import main

    main(["extract", str(src), "--out", str(store), *EXTRACT_TINY])
    ids = stored_ids(store)
    main(["extract", str(src), "--out", str(work / "clean"), *EXTRACT_TINY])
    same = all(np.array_equal(a.features, b.features)
               for a, b in zip(FeatureStore(store), FeatureStore(work / "clean"), strict=True))
    print(f"extraction: {sum(k.killed for k in kills)} kills landed of {len(kills)}, all survived; "
          f"entries {len(ids)} (unique {len(set(ids))}, expected {n}), corrupted 0 (every shard loads); "
          f"redone per kill max {max(k.redone for k in kills)}, total {sum(k.redone for k in kills)}; "
          f"features identical to a clean run: {same}")

    rngs = np.random.default_rng(0)
    centers = rngs.standard_normal((3, 8)) * 2
    feats = [(centers[i % 3] + rngs.standard_normal((4, 8))).astype(np.float32) for i in range(36)]
    FeatureStore.write_synthetic(work / "fstore", feats, [i % 3 for i in range(36)], ["x", "y", "z"],
                                 splits=["train"] * 28 + ["test"] * 8, num_crops=2, shard_size=8)
    epochs = 3 * points
    args = ["--epochs", str(epochs), "--batch-size", "4", "--lr", "0.05", "--lr-step", "4", "--train-views",
            "3", "--head-opt", "num_heads=2", "--dropout", "0.5", "--seed", "3", "--no-progress"]
    run = work / "run"
    tkills = []
    for _ in range(points):
        k = kill_training(work / "fstore", run, log, args, rng.randint(1, 2), rng.uniform(0, 0.05))
        tkills.append(k)
        print(f"  train kill: {k}")
    if (run / "checkpoints" / "last.pt").is_file():
        main(["train", str(work / "fstore"), "--out", str(run), *args, "--resume"])
    main(["train", str(work / "fstore"), "--out", str(work / "full"), *args])

    def rows(r):
        lines = csv.DictReader((r / "metrics.csv").open())
        return [{k: v for k, v in x.items() if k != "time_s"} for x in lines]

    print(f"training: {sum(k.killed for k in tkills)} kills landed of {len(tkills)}, all survived; "
          f"redone per kill max {max(k.redone for k in tkills)} epoch(s); "
          f"metrics identical to an uninterrupted run: {rows(run) == rows(work / 'full')}")


if __name__ == "__main__":
    import argparse
    import tempfile

    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["videos", "kills"])
    ap.add_argument("--points", type=int, default=8, help="kill points per run (kills)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="catnet-reliability-") as tmp:
        if a.what == "videos":
            _videos_figures(Path(tmp))
        else:
            _kill_figures(Path(tmp), a.points, a.seed)
