"""User-facing errors: the CLI prints them as one line and exits non-zero, never with a traceback."""

import os
import re


class CatnetError(Exception):
    """Bad input or a refused operation, explained in one line. CLI exit status 2."""

    exit_code = 2


class VideoError(CatnetError):
    """A video that cannot be decoded (corrupt, truncated, empty, not a video, unreadable)."""


def unpickling_refused(path, error: Exception) -> CatnetError:
    """The one-line error for a checkpoint that `torch.load(weights_only=True)` refused.

    PyTorch's own message suggests retrying with weights_only=False, the very thing an untrusted file must
    never get; name what the pickle wanted instead.
    """
    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"references {m[1]}" if m else "holds objects other than tensors"
    return CatnetError(f"refusing to load {path}: its pickle {what}; checkpoints are loaded weights-only "
                       "(a full unpickle could run code)")


def quoted(name) -> str:
    """A file name or path (str, bytes or os.PathLike) for a one-line message: as it is when it is plain
    printable text, else quoted with escapes, e.g. 'bad\\nname.mp4' or 'x\\udcffy.mp4' (a non-UTF-8 byte)."""
    text = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
    return text if text.isprintable() else repr(text)
