"""What a video source is to the jobs that read videos: a list of `VideoEntry` and the class names.

`list_videos(source, root=None)` accepts a folder (one sub-folder per class; videos directly in it are
unlabelled), a UCF101 or HMDB51 split folder (its split 1's train/test labels), or any annotation file
`catnet.data.annotations` reads, its relative paths resolved against `root` (default: the file's folder,
the split folder's parent). Ids are unique and stable: relative paths without suffix for
folders, the annotation's ids otherwise. `group` is the source video a clip was cut from ("" unknown).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from catnet.data.annotations import VIDEO_SUFFIXES, detect_format, load_annotations, read_folder
from catnet.errors import CatnetError

__all__ = ["VIDEO_SUFFIXES", "VideoEntry", "list_videos"]


@dataclass
class VideoEntry:
    id: str
    path: str  # absolute
    label: int = -1  # index into the classes, -1 when unknown
    split: str = ""
    group: str = ""


def list_videos(source: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[
        list[VideoEntry], list[str]]:
    """Videos and class names of a folder (one sub-folder per class) or an annotation file.

    Videos an annotation file lists but that are missing on disk are kept: they fail as "not found"
    where they are read, and are recorded there.
    """
    source = Path(source)
    if source.is_file():
        if root is not None and not Path(root).is_dir():
            raise CatnetError(f"--root {root} is not a folder")
        ann = load_annotations(source, root=root)
        items = [*ann.items, *ann.missing]
    elif not source.is_dir():
        raise CatnetError(f"source not found: {source}")
    elif detect_format(source) in ("ucf101", "hmdb51"):  # a folder of split lists (labels of split 1)
        if root is not None and not Path(root).is_dir():
            raise CatnetError(f"--root {root} is not a folder")
        ann = load_annotations(source, root=root)
        items = [*ann.items, *ann.missing]
    elif root is not None:
        raise CatnetError("--root applies to an annotation file or a UCF101/HMDB51 split folder; a folder "
                          "of class folders is its own root")
    else:
        ann = read_folder(source, unlabelled=True)
        items = ann.items
    label_of = {c: i for i, c in enumerate(ann.classes)}
    entries, seen = [], set()
    for it in items:
        if it.id in seen:
            raise CatnetError(f"annotation file {source} lists video id {it.id!r} twice")
        seen.add(it.id)
        label = -1 if it.label is None else label_of.get(it.label, -1)
        entries.append(VideoEntry(str(it.id), os.path.abspath(it.path), label, it.split or "",
                                  it.group or ""))
    if not entries:
        raise CatnetError(f"{source} lists no videos")
    return entries, list(ann.classes)
