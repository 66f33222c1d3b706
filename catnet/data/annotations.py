"""Dataset annotation readers: Kinetics CSV, UCF101 and HMDB51 split files, folder-per-class, plain CSV.

Every reader returns `Annotations(items, classes, missing)`: `items` are videos found on disk, `missing`
those listed but not found (reported, never fatal; `check_files=False` skips the check and keeps all).
Video paths are absolute. The dataset formats (Kinetics CSVs, UCF101 and HMDB51 split files) name videos
relative to the dataset root, so a path they would place outside it (`../`, or an absolute path
elsewhere) raises CatnetError: they are downloaded, untrusted input. The check is lexical, so symlinks
that the dataset's owner placed inside the root still work. A plain CSV is the user's own list: its
paths may be absolute or lead anywhere (`..`), relative ones resolved against `root` (default: the
CSV's folder).

Items carry a `group` where the names say which source video a clip was cut from, so that splits can
keep a source video on one side (catnet.engine.splits): UCF101 `v_<Class>_gGG_cCC` -> `<Class>_gGG`;
HMDB51 `<source>_<class>_<body>_<camera>_np<n>_<view>_<quality>_<clip>` -> `<source>`; Kinetics
`youtube_id`; a plain CSV's `group` column. Other names give no group (each video is its own).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from catnet.errors import CatnetError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif", ".flv", ".ogv")
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
          "validation": "val", "test": "test", "testing": "test"}
FORMATS = ("auto", "kinetics", "ucf101", "hmdb51", "folder", "csv")


@dataclass
class VideoItem:
    id: str
    path: Path  # absolute
    label: str | None  # None: unlabelled (e.g. the Kinetics test set)
    split: str | None = None  # "train" / "val" / "test"
    group: str | None = None  # the source video the clip was cut from, when known


@dataclass
class Annotations:
    items: list[VideoItem]
    classes: list[str]
    missing: list[VideoItem] = field(default_factory=list)

    def split(self, name: str) -> list[VideoItem]:
        return [it for it in self.items if it.split == name]


def _split_name(raw: str | None) -> str | None:
    if raw is None or not raw.strip():
        return None
    name = SPLITS.get(raw.strip().lower())
    if name is None:
        raise CatnetError(f"unknown split {raw!r}; expected one of train, val, test")
    return name


def _video_path(root: Path, rel: str, where: str) -> tuple[str, str]:
    """(the normalised absolute path of `rel` under `root`, root's absolute path); refuses a path that
    is empty or names a folder rather than a video file (".", "clips/")."""
    base = os.path.abspath(root)
    if not rel or "\x00" in rel:
        raise CatnetError(f"{where}: empty or invalid path {rel!r}")
    path = os.path.normpath(os.path.join(base, rel))  # an absolute `rel` replaces base
    if path == base or rel.rstrip().endswith(("/", os.sep)) or os.path.basename(path) in (".", ".."):
        raise CatnetError(f"{where}: path {rel!r} names a folder, not a video file")
    return path, base


def safe_join(root: Path, rel: str, where: str) -> Path:
    """root / rel for the dataset formats, refusing anything that would leave root (`where` names the
    offending line)."""
    path, base = _video_path(root, rel, where)
    if not path.startswith(base.rstrip(os.sep) + os.sep):
        raise CatnetError(f"{where}: path {rel!r} is outside the dataset root {base} (UCF101, HMDB51 and "
                          "Kinetics lists are meant to be relative to it; pass --root to say where it is)")
    return Path(path)


UCF_NAME = re.compile(r"^v_(?P<cls>[A-Za-z0-9]+)_g(?P<group>\d+)_c\d+$")
# HMDB51: <source>_<class>_<body part f|h|u|l>_<camera cm|nm>_np<people>_<view fr|ba|le|ri>_<quality>_<clip>
HMDB_TAGS = r"_[fhul]_(?:cm|nm)_np\d+_(?:fr|ba|le|ri)_(?:bad|med|goo)_\d+$"


def name_group(name: str, label: str | None = None) -> str | None:
    """The source video a clip file `name` (no folder, no suffix) was cut from, by the UCF101 or HMDB51
    naming rule (HMDB51's needs the class `label`, which sits inside the name); None when neither
    applies. No looser rule (e.g. any trailing "_<n>"): "run_2024" may as well be its own video."""
    m = UCF_NAME.match(name)
    if m:
        return f"{m['cls']}_g{m['group']}"
    if label:
        m = re.match(rf"^(?P<source>.+)_{re.escape(label)}{HMDB_TAGS}", name)
        if m:
            return m["source"]
    return None


def _finish(items: list[VideoItem], classes: list[str], check_files: bool) -> Annotations:
    if not check_files:
        return Annotations(items, classes, [])
    found, missing = [], []
    for it in items:
        (found if it.path.is_file() else missing).append(it)
    return Annotations(found, classes, missing)


def _rel_id(rel: str) -> str:
    return Path(rel).with_suffix("").as_posix()


# ----------------------------------------------------------------------------------------- Kinetics


def _index_videos(root: Path, depth: int = 2) -> dict[str, list[Path]]:
    """Stem -> video files in root and up to `depth` folder levels below (root/split/label/)."""
    index: dict[str, list[Path]] = {}
    level = [root]
    for d in range(depth + 1):
        nxt = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    if d < depth:
                        nxt.append(Path(e.path))
                elif Path(e.name).suffix.lower() in VIDEO_SUFFIXES:
                    index.setdefault(Path(e.name).stem, []).append(Path(e.path))
        level = nxt
    return index


def read_kinetics(csv_path: str | os.PathLike, root: str | os.PathLike | None = None,
                  check_files: bool = True) -> Annotations:
    """Kinetics-400/600/700 CSV: label,youtube_id,time_start,time_end,split (label absent for test).

    Videos are named {youtube_id}_{start:06d}_{end:06d}.<ext> (or {youtube_id}.<ext>) and are looked for
    under root/<split>/<label>/, root/<split>/ and root/ (and one more level of any name), `root`
    defaulting to the CSV's folder. A name found in several places resolves to the one under the row's
    own split/label folder. Classes are the sorted label names.
    """
    csv_path = Path(csv_path)
    root = Path(os.path.abspath(root if root is not None else csv_path.parent))
    rows = _read_csv_rows(csv_path)
    if not rows or "youtube_id" not in rows[0]:
        raise CatnetError(f"{csv_path}: not a Kinetics CSV (needs a header with youtube_id)")
    header, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    for need in ("youtube_id", "time_start", "time_end"):
        if need not in col:
            raise CatnetError(f"{csv_path}: Kinetics CSV has no {need!r} column")
    index = _index_videos(root) if check_files else {}
    items, missing, seen = [], [], set()
    for n, row in enumerate(body, start=2):
        where = f"{csv_path.name} line {n}"
        if len(row) < len(header):
            raise CatnetError(f"{where}: expected {len(header)} columns, got {len(row)}")
        ytid = row[col["youtube_id"]].strip()
        try:  # int(inf) is an OverflowError, int(nan) a ValueError
            start, end = int(float(row[col["time_start"]])), int(float(row[col["time_end"]]))
        except (ValueError, OverflowError):
            raise CatnetError(f"{where}: time_start/time_end must be finite numbers, got "
                              f"{row[col['time_start']]!r}, {row[col['time_end']]!r}") from None
        label = row[col["label"]].strip() if "label" in col else None
        raw_split = row[col["split"]].strip() if "split" in col else ""
        split = _split_name(raw_split)
        vid = f"{ytid}_{start:06d}_{end:06d}"
        if vid in seen:
            continue  # Kinetics CSVs repeat a few rows verbatim
        seen.add(vid)
        parts = [p for p in (raw_split, label) if p]
        expected = safe_join(root, "/".join([*parts, vid + ".mp4"]), where)
        if ytid != Path(ytid).name:
            raise CatnetError(f"{where}: youtube_id {ytid!r} is not a plain name")
        item = VideoItem(vid, expected, label or None, split, group=ytid)  # clips of one YouTube video
        found = index.get(vid) or index.get(ytid)
        if found:
            # prefer the copy in the row's own split/label folder; paths in the index are inside root
            item.path = next((p for p in found if p.parent == expected.parent), found[0])
            items.append(item)
        elif check_files:
            missing.append(item)
        else:
            items.append(item)
    classes = sorted({it.label for it in items + missing if it.label})
    return Annotations(items, classes, missing)


# ------------------------------------------------------------------------------------- UCF101 / HMDB51


def _text_lines(path: Path) -> list[str]:
    """A split list's lines; one-line errors for a file that is unreadable or not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CatnetError(f"{path} is not UTF-8 text (byte {e.start}): re-save it as UTF-8") from None
    except OSError as e:
        raise CatnetError(f"cannot read {path}: {e.strerror or e}") from None


def read_ucf101(split_dir: str | os.PathLike, root: str | os.PathLike | None = None, split_id: int = 1,
                check_files: bool = True) -> Annotations:
    """UCF101 split files: classInd.txt ("1 ApplyEyeMakeup"), trainlist0N.txt ("Class/v_x.avi 1") and
    testlist0N.txt ("Class/v_x.avi"). Video paths are relative to `root` (default: split_dir's parent).
    Classes follow classInd order; ids are the relative paths without suffix; groups `<Class>_gGG`."""
    split_dir = Path(split_dir)
    root = Path(root) if root is not None else split_dir.parent
    if split_id not in (1, 2, 3):
        raise CatnetError(f"UCF101 has splits 1, 2, 3; got {split_id}")
    class_file = split_dir / "classInd.txt"
    if not class_file.is_file():
        raise CatnetError(f"{split_dir}: no classInd.txt (not a UCF101 split folder)")
    classes = []
    for n, line in enumerate(_text_lines(class_file), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) != len(classes) + 1:
            raise CatnetError(f"classInd.txt line {n}: expected '<index> <class>' in order, got {line!r}")
        classes.append(parts[1])
    folder_to_class = {c.lower(): c for c in classes}
    items = []
    for split in ("train", "test"):
        list_file = split_dir / f"{split}list{split_id:02d}.txt"
        if not list_file.is_file():
            raise CatnetError(f"{split_dir}: missing {list_file.name}")
        for n, line in enumerate(_text_lines(list_file), start=1):
            if not line.strip():
                continue
            where = f"{list_file.name} line {n}"
            parts = line.split()
            rel = parts[0]
            if len(parts) > 1:
                if not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(classes):
                    raise CatnetError(f"{where}: bad class index {parts[1]!r}")
                label = classes[int(parts[1]) - 1]
            else:  # test lists carry no index: the folder names the class
                label = folder_to_class.get(Path(rel).parts[0].lower()) if len(Path(rel).parts) > 1 else None
                if label is None:
                    raise CatnetError(f"{where}: cannot tell the class of {rel!r}")
            items.append(VideoItem(_rel_id(rel), safe_join(root, rel, where), label, split,
                                   group=name_group(Path(rel).stem)))
    return _finish(items, classes, check_files)


HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<n>\d)\.txt$")


def read_hmdb51(split_dir: str | os.PathLike, root: str | os.PathLike | None = None, split_id: int = 1,
                check_files: bool = True) -> Annotations:
    """HMDB51 split files <class>_test_split<N>.txt, lines "<video> <flag>" with flag 1 = train,
    2 = test, 0 = unused (skipped). Videos live in root/<class>/<video>. Classes are sorted. A clip's
    group is its source video: the name before `_<class>_<tags>_<clip>` (`name_group`)."""
    split_dir = Path(split_dir)
    root = Path(root) if root is not None else split_dir.parent
    files = sorted(p for p in split_dir.glob(f"*_test_split{split_id}.txt") if HMDB_SPLIT.match(p.name))
    if not files:
        raise CatnetError(f"{split_dir}: no HMDB51 files *_test_split{split_id}.txt")
    classes = sorted(HMDB_SPLIT.match(p.name)["cls"] for p in files)
    items = []
    for p in files:
        cls = HMDB_SPLIT.match(p.name)["cls"]
        for n, line in enumerate(_text_lines(p), start=1):
            if not line.strip():
                continue
            where = f"{p.name} line {n}"
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise CatnetError(f"{where}: expected '<video> <0|1|2>', got {line.strip()!r}")
            if parts[1] == "0":
                continue
            rel = f"{cls}/{parts[0]}"
            split = "train" if parts[1] == "1" else "test"
            items.append(VideoItem(_rel_id(rel), safe_join(root, rel, where), cls, split,
                                   group=name_group(Path(parts[0]).stem, cls)))
    return _finish(items, classes, check_files)


# ------------------------------------------------------------------------------------ folder and CSV


def is_video(path: Path) -> bool:
    """A visible file with one of VIDEO_SUFFIXES."""
    return path.suffix.lower() in VIDEO_SUFFIXES and not path.name.startswith(".") and path.is_file()


def read_folder(root: str | os.PathLike, unlabelled: bool = False) -> Annotations:
    """root/<class>/<video> (videos may sit deeper inside a class folder); hidden entries are ignored.

    Ids are relative paths without suffix ("class/name"). Videos directly in root have no class: they
    are skipped, or listed with label None when `unlabelled`. Two files mapping to one id ("a.mp4"
    next to "a.avi") are refused. Groups follow the UCF101 / HMDB51 names (`name_group`); any other
    video is its own group.
    """
    root = Path(os.path.abspath(root))
    items, seen = [], {}
    for p in sorted(_files_under(root)):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not is_video(p):
            continue
        if len(rel.parts) == 1 and not unlabelled:
            continue
        vid = _rel_id(rel.as_posix())
        if vid in seen:
            raise CatnetError(f"two videos map to id {vid!r}: {seen[vid]} and {p}; rename one")
        seen[vid] = p
        label = rel.parts[0] if len(rel.parts) > 1 else None
        items.append(VideoItem(vid, p, label, None, group=name_group(p.stem, label)))
    classes = sorted({it.label for it in items if it.label})  # a folder without videos is not a class
    if not items:
        where = "" if unlabelled else " in class folders"
        raise CatnetError(f"no videos found{where} in {root} (looked for {', '.join(VIDEO_SUFFIXES)})")
    return Annotations(items, classes, [])


def _files_under(root: Path) -> list[Path]:
    """Every file below `root`, following symlinked folders (a class folder linked in from elsewhere is
    still a class; Path.rglob skips them) but never the same folder twice (link cycles)."""
    files, visited = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited:
            dirs[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        files += [Path(folder) / n for n in names]
    return files


def _read_csv_rows(path: Path) -> list[list[str]]:
    try:
        # utf-8-sig: spreadsheet programs start CSV files with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [[c.strip() for c in row] for row in csv.reader(f) if row and any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CatnetError(f"cannot read {path}: {e}") from None


CSV_COLUMNS = ("path", "label", "split", "group")


def _csv_layout(rows: list[list[str]], csv_path: Path) -> tuple[dict[str, int], int]:
    """Column name -> index, and the first data row. A header row names its columns (any order, `path`
    required); without one the columns are path,label[,split[,group]]."""
    first = [c.lower() for c in rows[0]] if rows else []
    if "path" not in first:
        return {name: i for i, name in enumerate(CSV_COLUMNS)}, 0
    unknown = [c for c in first if c not in CSV_COLUMNS]
    if unknown or len(set(first)) != len(first):
        raise CatnetError(f"{csv_path.name} line 1: header columns must be distinct names among "
                          f"{', '.join(CSV_COLUMNS)}; got {', '.join(rows[0])}")
    return {name: i for i, name in enumerate(first)}, 1


def read_csv(csv_path: str | os.PathLike, root: str | os.PathLike | None = None,
             check_files: bool = True) -> Annotations:
    """Plain CSV rows path,label[,split[,group]], or any order under a header row naming them. Relative
    paths are resolved against `root` (default: the CSV's folder); absolute ones and ones outside the
    root are accepted (the user's own list). An empty label means unlabelled. `group` names the source
    video (clips of one never straddle train and validation); without it the UCF101 / HMDB51 naming
    rules apply (`name_group`). Ids are paths relative to the root without suffix (absolute outside it).
    Classes are sorted labels."""
    csv_path = Path(csv_path)
    root = Path(os.path.abspath(root if root is not None else csv_path.parent))
    rows = _read_csv_rows(csv_path)
    col, start = _csv_layout(rows, csv_path)
    width = len(rows[0]) if start else len(CSV_COLUMNS)
    layout = ",".join(rows[0]) if start else "path,label[,split[,group]]"
    items = []
    for n, row in enumerate(rows[start:], start=start + 1):
        where = f"{csv_path.name} line {n}"
        if not 1 <= len(row) <= width:
            raise CatnetError(f"{where}: expected {layout}, got {len(row)} columns")
        cell = {name: row[i] for name, i in col.items() if i < len(row)}
        path, base = _video_path(root, cell.get("path", ""), where)
        label = cell.get("label") or None
        inside = path.startswith(base.rstrip(os.sep) + os.sep)
        vid = _rel_id(os.path.relpath(path, base) if inside else path)
        group = cell.get("group") or name_group(Path(path).stem, label)
        items.append(VideoItem(vid, Path(path), label, _split_name(cell.get("split")), group=group))
    if not items:
        raise CatnetError(f"{csv_path}: lists no videos")
    classes = sorted({it.label for it in items if it.label})
    return _finish(items, classes, check_files)


# ------------------------------------------------------------------------------------------- entry


def detect_format(source: Path) -> str:
    if source.is_dir():
        if (source / "classInd.txt").is_file():
            return "ucf101"
        if any(HMDB_SPLIT.match(p.name) for p in source.glob("*_test_split*.txt")):
            return "hmdb51"
        return "folder"
    if source.suffix.lower() == ".csv":
        rows = _read_csv_rows(source)
        header = {c.lower() for c in rows[0]} if rows else set()
        return "kinetics" if {"youtube_id", "time_start"} <= header else "csv"
    raise CatnetError(f"cannot tell the annotation format of {source}; "
                      f"pass fmt= one of {', '.join(FORMATS[1:])}")


def load_annotations(source: str | os.PathLike, root: str | os.PathLike | None = None, fmt: str = "auto",
                     split_id: int = 1, check_files: bool = True) -> Annotations:
    """Read any supported annotation source; `fmt="auto"` decides from what `source` is:
    a folder with classInd.txt -> ucf101, with *_test_splitN.txt -> hmdb51, otherwise class folders;
    a .csv with youtube_id/time_start columns -> kinetics, any other .csv -> plain path,label[,split]."""
    source = Path(source)
    if fmt not in FORMATS:
        raise CatnetError(f"unknown annotation format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not source.exists():
        raise CatnetError(f"annotations not found: {source}")
    if fmt == "auto":
        fmt = detect_format(source)
    if fmt == "kinetics":
        return read_kinetics(source, root, check_files)
    if fmt == "ucf101":
        return read_ucf101(source, root, split_id, check_files)
    if fmt == "hmdb51":
        return read_hmdb51(source, root, split_id, check_files)
    if fmt == "folder":
        if not source.is_dir():
            raise CatnetError(f"{source} is not a folder of class folders")
        return read_folder(source)
    return read_csv(source, root, check_files)
