"""From a feature store to batches: datasets, padding collate, read-ahead, and the checks on the way.

    loader = feature_loader(store, labels, indices, batch_size=64, num_workers=0, max_views=10, seed=0,
                            epoch=3)
    for batch in loader:   # {"x" (B, K, D) float32, "mask" (B, K) bool, "label" (B,), "index" (B,)}

Training and evaluation read the same way: one `pread` per video (FeatureStore), kernel read-ahead hints
for the next batches (HintedBatches), and with num_workers=0 a read-ahead thread (ReadAhead).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from catnet.errors import CatnetError
from catnet.features.store import FeatureStore
from catnet.utils import distributed as dist
from catnet.utils.threads import threaded


class ClipFeatureDataset(Dataset):
    """Store videos as (features (V', D) in the stored dtype, label, store index), indexed by *store index*.

    With `max_views`, each fetch keeps a random subset of at most that many views (kept in temporal
    order) — the paper's "randomly choose a few features to train". The subset depends only on
    (seed, epoch, video), so it is the same whatever the worker count and after a resume.
    """

    def __init__(self, store: FeatureStore, labels: np.ndarray, max_views: int | None = None, seed: int = 0):
        self.store = store
        self.labels = labels  # per store index, already in the head's class space
        self.max_views = max_views
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        # stored dtype (float16): views are dropped first, and collate widens the whole batch at once
        feats = self.store.read_features(index)
        if self.max_views is not None and feats.shape[0] > self.max_views:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            feats = feats[np.sort(rng.choice(feats.shape[0], self.max_views, replace=False))]
        return feats, int(self.labels[index]), index


def pad_collate(batch: list[tuple[np.ndarray, int, int]]) -> dict[str, torch.Tensor]:
    """Zero-pad videos to the batch's longest as float32; mask (B, K) is True on real views."""
    sizes = [f.shape[0] for f, _, _ in batch]
    k = max(sizes)
    if min(sizes) == k:  # the usual case: one stack and one widening copy for the whole batch
        x = torch.from_numpy(np.stack([f for f, _, _ in batch])).float()
        mask = torch.ones(len(batch), k, dtype=torch.bool)
    else:
        x = torch.zeros(len(batch), k, batch[0][0].shape[1], dtype=torch.float32)
        mask = torch.zeros(len(batch), k, dtype=torch.bool)
        for i, (f, _, _) in enumerate(batch):
            x[i, : f.shape[0]] = torch.from_numpy(f)
            mask[i, : f.shape[0]] = True
    return {"x": x, "mask": mask, "label": torch.tensor([b[1] for b in batch], dtype=torch.int64),
            "index": torch.tensor([b[2] for b in batch], dtype=torch.int64)}


def nonfinite_ids(batch: dict[str, torch.Tensor], store: FeatureStore) -> list[str]:
    # a NaN or +-Inf anywhere makes the video's sum non-finite; features are float16-range, so the
    # float32 sum of a finite video cannot overflow. One reduction instead of an elementwise test.
    bad = ~torch.isfinite(batch["x"].sum(dim=(1, 2)))
    return [store.ids[i] for i in batch["index"][bad].tolist()] if bad.any() else []


def check_finite(batch: dict[str, torch.Tensor], store: FeatureStore, collective: bool = False) -> None:
    """NaN/Inf features would silently poison the weights; name the videos instead.

    `collective`: every DDP rank calls this in lockstep and all of them raise when any rank saw a bad
    video, so no rank is left waiting in a gradient all-reduce.
    """
    raise_nonfinite(nonfinite_ids(batch, store), store, collective)


def raise_nonfinite(ids: list[str], store: FeatureStore, collective: bool = False) -> None:
    total = len(ids)
    if collective and dist.world_size() > 1:
        total = int(dist.all_reduce_sum(torch.tensor(len(ids))))
    if total:
        where = ", ".join(ids[:5]) if ids else "seen by another process"
        raise CatnetError(f"non-finite (NaN/Inf) clip features in {total} video(s) of {store.root}: "
                          f"{where}; re-extract or remove them")


def store_feature_dim(store: FeatureStore) -> int:
    d = store.manifest.get("num_features")
    if not d:
        if len(store) == 0:
            raise CatnetError(f"feature store {store.root} is empty")
        d = store[0].features.shape[1]
    return int(d)


def label_map(head_classes: list[str], store: FeatureStore) -> np.ndarray:
    """Store label index -> head class index, matching by name; refuses classes the head lacks."""
    store_classes = store.classes
    if store_classes == head_classes:
        return np.arange(len(store_classes))
    where = {c: i for i, c in enumerate(head_classes)}
    missing = [c for c in store_classes if c not in where]
    if missing:
        raise CatnetError(f"the model's {len(head_classes)} classes do not match store {store.root} "
                          f"({len(store_classes)} classes; e.g. {', '.join(map(repr, missing[:3]))} unknown "
                          "to the model); evaluate on a store with the run's label set")
    return np.array([where[c] for c in store_classes], dtype=np.int64)


def mapped_labels(store: FeatureStore, head_classes: list[str], indices: list[int]) -> np.ndarray:
    """Labels of all store videos in head class space; refuses unlabelled videos among `indices`."""
    raw = store.labels
    unlabelled = [store.ids[i] for i in indices if not 0 <= raw[i] < len(store.classes)]
    if unlabelled:
        raise CatnetError(f"{len(unlabelled)} video(s) without a valid label in {store.root} "
                          f"(e.g. {unlabelled[0]!r}); labels are needed to train and evaluate")
    lut = label_map(head_classes, store)
    return np.where((raw >= 0) & (raw < len(lut)), lut[np.clip(raw, 0, len(lut) - 1)], -1)


class ReadAhead:
    """Iterate a loader with the next `depth` batches read by a background thread.

    With num_workers=0 reading and training would otherwise take turns. Reading is mostly `pread`,
    which releases the GIL, so a thread overlaps the disk with the step at no IPC cost (a worker
    process must pickle every batch). Batches come out in the loader's order, and the loader's
    iterator is created here, in the caller's thread, so RNG draws happen where they always did.
    """

    def __init__(self, loader: DataLoader, depth: int = 2):
        self.loader, self.depth = loader, depth

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)  # here, in the caller's thread: RNG draws happen where they always did
        return threaded(lambda stop: it, self.depth, "catnet-readahead")


class HintedBatches(Sampler[list[int]]):
    """`indices` in batches, in order; before handing out a batch, names the `ahead` batches after it
    to the store (FeatureStore.will_need) so their disk reads overlap the work on this one.

    The hints come from this (the main) process, and the page cache is shared, so they also feed
    DataLoader worker processes.
    """

    def __init__(self, indices: list[int], batch_size: int, store: FeatureStore, ahead: int = 2):
        self.indices, self.batch_size, self.store, self.ahead = list(indices), batch_size, store, ahead

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        batches = [self.indices[i: i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)]
        for n, batch in enumerate(batches):
            # the first time: this batch and the next `ahead`; afterwards the one batch newly in reach
            for later in batches[n + self.ahead if n else 0: n + self.ahead + 1]:
                self.store.will_need(later)
            yield batch


def feature_loader(store: FeatureStore, labels: np.ndarray, indices: list[int], batch_size: int,
                   num_workers: int = 0, max_views: int | None = None, seed: int = 0, epoch: int = 0):
    """Batches of store videos `indices` in order (padded, masked; see pad_collate); with `max_views`,
    each video keeps a random subset of that many views, drawn from (seed, epoch, video)."""
    ds = ClipFeatureDataset(store, labels, max_views=max_views, seed=seed)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_sampler=HintedBatches(indices, batch_size, store),
                        collate_fn=pad_collate, num_workers=num_workers)
    return ReadAhead(loader) if num_workers == 0 else loader
