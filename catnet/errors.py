"""User-facing errors: the CLI prints them as one line and exits non-zero, never with a traceback."""


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
    import re

    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"references {m[1]}" if m else "holds objects other than tensors"
    return CatnetError(f"refusing to load {path}: its pickle {what}; checkpoints are loaded weights-only "
                       "(a full unpickle could run code)")
