"""Where catnet keeps downloaded and converted files."""

import os
from pathlib import Path


def catnet_home() -> Path:
    """`$CATNET_HOME`, default `~/.cache/catnet`."""
    return Path(os.environ.get("CATNET_HOME") or Path.home() / ".cache" / "catnet")


def label_file(name: str) -> Path:
    """A class-name list shipped inside the package (catnet/labels/NAME)."""
    return Path(__file__).resolve().parents[1] / "labels" / name


def read_labels(name: str) -> list[str]:
    return [ln.strip() for ln in label_file(name).read_text().splitlines() if ln.strip()]
