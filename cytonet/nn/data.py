"""Datasets and samplers over patch stores (docs/contracts.md, "Patch store"), for pretraining and finetuning.

Zarr arrays are opened lazily in each process (DataLoader worker) on first access and never pickled open; one
patch is one chunk, so each read decodes exactly one chunk. Stores that together hold at most ``cache_mb``
(default 1024, or ``$CYTONET_PATCH_CACHE_MB``) are decoded into memory once per process instead: a per-patch chunk
read costs ~0.8 ms, which made the demo's pretraining loader-bound. Augmentations run in torch on single-channel
uint8.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch.utils.data import Dataset, Sampler

from cytonet.nn.models import normalize_uint8


class PatchStores:
    """A list of patch stores seen as one table; patch pixels are read lazily and per process."""

    def __init__(self, stores: Sequence[str | Path], cache_mb: float | None = None) -> None:
        if not stores:
            raise ValueError("no patch stores given")
        self.paths = [Path(s) for s in stores]
        tables, sizes, self.brains, ums = [], [], [], []
        for i, p in enumerate(self.paths):
            if not (p / "patches.parquet").exists() or not (p / "patches.zarr").exists():
                raise FileNotFoundError(f"{p}: not a patch store (needs patches.zarr and patches.parquet)")
            if not (p / "manifest.json").exists():
                raise FileNotFoundError(f"{p}: manifest.json missing, the store is incomplete")
            import zarr  # opened here only to read metadata; handles are dropped before any fork/pickle

            arr = zarr.open_group(str(p / "patches.zarr"), mode="r")
            attrs = dict(arr.attrs)
            shape = arr["patches"].shape
            t = pd.read_parquet(p / "patches.parquet")
            if len(t) != shape[0]:
                raise ValueError(f"{p}: parquet has {len(t)} rows but patches has {shape[0]}")
            t = t.assign(store=i, row=np.arange(len(t), dtype=np.int64))
            tables.append(t)
            sizes.append(shape[1])
            ums.append(attrs.get("pixel_size_um"))
            self.brains.append(str(attrs.get("brain", t["brain"].iloc[0] if len(t) else p.name)))
        if len(set(sizes)) > 1:
            by_store = dict(zip(map(str, self.paths), sizes, strict=True))
            raise ValueError(f"patch sizes differ between stores: {by_store}")
        if len({u for u in ums if u is not None}) > 1:
            raise ValueError(f"pixel sizes differ between stores: {dict(zip(map(str, self.paths), ums, strict=True))}")
        self.patch_px = sizes[0]
        self.pixel_size_um = next((float(u) for u in ums if u is not None), None)
        self.table = pd.concat(tables, ignore_index=True)
        self.cache_bytes = (cache_mb if cache_mb is not None
                            else float(os.environ.get("CYTONET_PATCH_CACHE_MB", 1024))) * 2**20
        self._arrays: list | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"], state["_pid"] = None, None  # never ship open handles to workers
        return state

    def _open(self) -> list:
        # Re-open after fork/spawn: handles (and zarr's event loop) must belong to this process.
        if self._arrays is None or self._pid != os.getpid():
            import zarr

            arrays = [zarr.open_group(str(p / "patches.zarr"), mode="r")["patches"] for p in self.paths]
            if sum(a.nbytes for a in arrays) <= self.cache_bytes:
                arrays = [a[...] for a in arrays]  # small stores: decode once, then reads are memory copies
            self._arrays = arrays
            self._pid = os.getpid()
        return self._arrays

    def read(self, i: int) -> np.ndarray:
        """uint8 [S, S] of global row i (one chunk read, or a copy from the in-memory cache)."""
        store, row = int(self.table_store[i]), int(self.table_row[i])
        return np.array(self._open()[store][row])

    @property
    def table_store(self) -> np.ndarray:
        if not hasattr(self, "_store_col"):
            self._store_col = self.table["store"].to_numpy()
            self._row_col = self.table["row"].to_numpy()
        return self._store_col

    @property
    def table_row(self) -> np.ndarray:
        _ = self.table_store  # fills both column caches
        return self._row_col

    def xyz(self) -> np.ndarray:
        """float64 [N, 3] 3D reference coordinates in mm."""
        return self.table[["x_mm", "y_mm", "z_mm"]].to_numpy(np.float64)


# ----------------------------------------------------------------------------------------------- augmentation
@dataclass
class AugmentConfig:
    """Histology augmentations; all in torch on one channel."""

    rot90: bool = True
    flip: bool = True
    max_angle_deg: float = 15.0  # small arbitrary rotation on top of the 90° multiples
    scale: tuple[float, float] = (0.8, 1.0)  # random-resized-crop style zoom-in
    brightness: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.25)
    gamma: tuple[float, float] = (0.75, 1.33)  # stain-intensity non-linearity differs between brains
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise_p: float = 0.3
    noise_std: float = 0.03


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def augment(patch: np.ndarray | torch.Tensor, gen: torch.Generator, cfg: AugmentConfig | None = None,
            out_px: int | None = None) -> torch.Tensor:
    """uint8 [H, W] (numpy, or a tensor on any device) -> augmented, normalised float32 [1, out_px, out_px].

    Random draws come from the CPU generator `gen`; the pixel work runs where `patch` lives (GPU-side
    augmentation for large patches, see pretrain config key augment_on).
    """
    cfg = cfg or AugmentConfig()
    t = patch if isinstance(patch, torch.Tensor) else torch.as_tensor(np.asarray(patch))
    x = t.float().div_(255.0)[None, None]  # [1,1,H,W] in [0,1]
    size = out_px or x.shape[-1]

    def u(lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=gen))

    if cfg.rot90:
        x = torch.rot90(x, int(torch.randint(4, (), generator=gen)), dims=(2, 3))
    if cfg.flip and torch.rand((), generator=gen) < 0.5:
        x = torch.flip(x, dims=(3,))
    # One affine resample does small rotation + zoom (area fraction in `scale`) + shift inside the patch.
    angle = math.radians(u(-cfg.max_angle_deg, cfg.max_angle_deg))
    s = math.sqrt(u(*cfg.scale))
    max_shift = 1.0 - s
    tx, ty = u(-max_shift, max_shift), u(-max_shift, max_shift)
    theta = torch.tensor([[s * math.cos(angle), -s * math.sin(angle), tx],
                          [s * math.sin(angle), s * math.cos(angle), ty]], dtype=torch.float32, device=x.device)[None]
    grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # Intensity: gamma (applied on [0,1]), then contrast about the mean and brightness shift.
    x = x.clamp_(1e-4, 1.0).pow_(u(*cfg.gamma))
    m = x.mean()
    x = (x - m) * u(*cfg.contrast) + m + u(-cfg.brightness, cfg.brightness)
    if torch.rand((), generator=gen) < cfg.blur_p:
        x = _gauss_blur(x, u(*cfg.blur_sigma))
    if torch.rand((), generator=gen) < cfg.noise_p:
        if x.device.type == "cpu":
            x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
        else:  # a CPU generator cannot fill device memory; the device's own RNG is seeded per rank
            x = x + cfg.noise_std * torch.randn(x.shape, device=x.device)
    return normalize_uint8(x.clamp_(0, 1)[0])[0]


def plain(patch: np.ndarray | torch.Tensor, out_px: int | None = None) -> torch.Tensor:
    """uint8 [H, W] -> normalised float32 [1, out_px, out_px] without augmentation."""
    x = torch.as_tensor(np.asarray(patch))[None, None].float().div_(255.0)
    if out_px and out_px != x.shape[-1]:
        x = F.interpolate(x, size=(out_px, out_px), mode="bilinear", antialias=True, align_corners=False)
    return normalize_uint8(x[0])[0]


def item_generator(seed: int, key: int, salt: int) -> torch.Generator:
    """The random generator of one sample, from (seed, draw key, salt): independent of rank and worker count,
    and resumable."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + key * 7919 + salt * 104_729) % (2**63 - 1))
    return g


# ------------------------------------------------------------------------------------------------ pretraining
#: Which neighbours may be SpatialNCE partners. ``other_section``: only patches of another section, so a pair
#: never shares pixels (two patches of one section within a 1 mm ball overlap, and matching pixels solves the
#: task); ``ball``: any other patch within the radius, the anchor's own section included.
POSITIVES = ("other_section", "ball")


class SpatialPairDataset(Dataset):
    """Item (anchor index, draw key) -> two augmented views of an anchor and a partner within radius_mm in 3D.

    The partner is a patch within the radius (KD-tree over all stores) on another section of the anchor's brain
    (``positives="other_section"``, the default; ``"ball"`` also allows the anchor's own section, ``within_brain``
    False other brains). With no such neighbour the anchor itself is used again (a second augmentation); the
    returned flag counts those fallbacks.
    """

    def __init__(self, stores: PatchStores, radius_mm: float, seed: int = 0, within_brain: bool = True,
                 out_px: int | None = None, aug: AugmentConfig | None = None, raw: bool = False,
                 positives: str = "other_section") -> None:
        if positives not in POSITIVES:
            raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
        self.stores, self.radius, self.seed, self.raw = stores, float(radius_mm), seed, raw
        self.xyz = stores.xyz()
        self.tree = cKDTree(self.xyz)
        self.brain = stores.table["store"].to_numpy() if within_brain else None
        self.section = None
        if positives == "other_section":  # codes of (store, section): section ids need not be unique across stores
            keys = stores.table["store"].astype(str) + "/" + stores.table["section"].astype(str)
            self.section = pd.factorize(keys)[0]
        self.out_px, self.aug = out_px, aug or AugmentConfig()

    def __len__(self) -> int:
        return len(self.stores)

    def partner(self, anchor: int, gen: torch.Generator) -> tuple[int, bool]:
        """A random neighbour of `anchor` within the radius, or (anchor, True) when there is none."""
        nb = self.tree.query_ball_point(self.xyz[anchor], self.radius)
        nb = [j for j in nb if j != anchor and (self.brain is None or self.brain[j] == self.brain[anchor])
              and (self.section is None or self.section[j] != self.section[anchor])]
        if not nb:
            return anchor, True
        return nb[int(torch.randint(len(nb), (), generator=gen))], False

    def __getitem__(self, item: tuple[int, int]) -> dict:
        anchor, key = int(item[0]), int(item[1])
        gen = item_generator(self.seed, key, 1)
        other, fallback = self.partner(anchor, gen)
        if self.raw:  # augmentation happens later on the device (augment_views): ship uint8 and the draw key
            v1, v2 = torch.from_numpy(self.stores.read(anchor).copy()), torch.from_numpy(self.stores.read(other).copy())
        else:
            v1 = augment(self.stores.read(anchor), gen, self.aug, self.out_px)
            v2 = augment(self.stores.read(other), gen, self.aug, self.out_px)
        return {"view1": v1, "view2": v2, "key": torch.tensor(key),
                "xyz1": torch.tensor(self.xyz[anchor], dtype=torch.float32),
                "xyz2": torch.tensor(self.xyz[other], dtype=torch.float32), "fallback": torch.tensor(fallback)}


def augment_views(raw: torch.Tensor, keys: torch.Tensor, seed: int, salt: int, aug: AugmentConfig | None = None,
                  out_px: int | None = None) -> torch.Tensor:
    """Augment a raw uint8 batch [B,H,W] where it lives (e.g. on the GPU), randomness keyed by draw."""
    return torch.stack([augment(r, item_generator(seed, int(k), salt), aug, out_px)
                        for r, k in zip(raw, keys, strict=True)])


class AnchorSampler(Sampler):
    """Anchor draws for one epoch, sharded over ranks; deterministic in (seed, epoch); can skip ahead on resume.

    Each epoch concatenates seeded permutations of all patches (so patches are drawn evenly) until
    `draws_per_rank * world_size` draws exist; rank r takes every world_size-th draw. Yields
    (anchor index, global draw key) so items are reproducible whatever the worker layout.
    """

    def __init__(self, n_patches: int, draws_per_rank: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.n, self.per_rank, self.rank, self.world, self.seed = n_patches, draws_per_rank, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first `start` draws of this rank (resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        total = self.per_rank * self.world
        g = torch.Generator()
        g.manual_seed(self.seed * 7_777_777 + self.epoch)
        reps = -(-total // self.n)
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])[:total]
        base = self.epoch * total
        for pos in range(self.rank + self.start * self.world, total, self.world):
            yield int(order[pos]), base + pos


def collate_pairs(items: list[dict]) -> dict:
    """Stack pair items into a batch."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ------------------------------------------------------------------------------------------------- finetuning
class LabelledPatchDataset(Dataset):
    """Rows (global index, class index) of a PatchStores -> (patch tensor, class index).

    An item is a row position, or (row position, draw key): then augmentation comes from a generator keyed by the
    draw, so a sample's augmentation does not depend on which rank or loader worker reads it (finetuning's
    EpochDraws yields such items).
    """

    def __init__(self, stores: PatchStores, indices: np.ndarray, labels: np.ndarray, augment_: bool = False,
                 seed: int = 0, out_px: int | None = None, aug: AugmentConfig | None = None) -> None:
        self.stores, self.indices, self.labels = stores, np.asarray(indices), np.asarray(labels)
        self.augment, self.seed, self.out_px, self.aug = augment_, seed, out_px, aug or AugmentConfig()
        self.calls = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        k, key = item if isinstance(item, tuple) else (item, None)
        patch = self.stores.read(int(self.indices[k]))
        if self.augment and key is not None:
            x = augment(patch, item_generator(self.seed, key, 5), self.aug, self.out_px)
        elif self.augment:
            # Fresh randomness per call (epochs differ); torch's per-worker seeding makes it reproducible.
            x = augment(patch, torch.default_generator, self.aug, self.out_px)
        else:
            x = plain(patch, self.out_px)
        return x, int(self.labels[k])


DEFAULT_VAL_FRACTION = 0.2  # labelled sections held out for validation (finetune; the baseline repeats it)


def split_by_section(rows: pd.DataFrame, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) holding out whole sections, so no section is in both (honest validation)."""
    keys = (rows["brain"].astype(str) + "/" + rows["section"].astype(str)).to_numpy()
    sections = np.unique(keys)
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(sections)))
    if val_fraction > 0 and len(sections) >= 2:
        n_val = min(max(1, n_val), len(sections) - 1)
    else:
        n_val = 0
    val_sections = set(rng.permutation(sections)[:n_val])
    val = np.array([k in val_sections for k in keys], dtype=bool)
    return ~val, val
