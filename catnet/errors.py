"""User-facing errors: the CLI prints them as one line and exits non-zero, never with a traceback."""


class CatnetError(Exception):
    """Bad input or a refused operation, explained in one line. CLI exit status 2."""

    exit_code = 2


class VideoError(CatnetError):
    """A video that cannot be decoded (corrupt, truncated, empty, not a video, unreadable)."""
