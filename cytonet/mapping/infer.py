"""Whole-section inference: dense (shared convolutional features) and naive (one network run per window).

Model interface (:class:`DenseModel`)
-------------------------------------
A patch classifier is split at its global average pool::

    trunk(x: float [B,1,H,W]) -> float [B,C,H/net_stride,W/net_stride]    everything before the global pool
    head(pooled: float [B,C]) -> logits [B,n_areas]                        everything after it (any module)
    net_stride: int                                                        e.g. 32 (torchvision ResNet), 16 (small)

plus ``window_px`` (S, the network input side), ``pixel_size_um`` (resolution the network sees), the area ids and
names (column order of the logits) and ``preprocess`` (uint8 -> normalised float, default
:func:`cytonet.nn.models.normalize_uint8`, the one function training also uses). :func:`as_dense_model` builds it from
a torchvision ResNet, :class:`cytonet.nn.models.Encoder`, the small ResNet, ``cytonet.nn.checkpoints.Classifier`` or any
module with ``trunk``/``head``/``net_stride``; :func:`load_classifier` builds it from finetune's ``classifier.pt``,
:func:`load_bundle_model` from a model bundle (``cytonet export-model``; safetensors weights, checked model card).

Output grid and the two paths
-----------------------------
The image is read at ``pixel_size_um`` (p). Output cell (i, j) covers input pixels [iT, (i+1)T) (T = output_um / p)
and its window is the S×S square centred on that cell. *Naive*: cut every window inside the tissue mask, run
``head(mean(trunk(window)))`` (= the classifier's forward) in batches. *Dense*: read large tiles (core plus a halo of
S/2 + the trunk's receptive-field margin, both rounded up to whole feature cells), run the trunk once per tile,
average-pool the feature map with a (S/s)×(S/s) box (s = net_stride) and apply the head at every output location.
Tile origins are aligned to one global feature grid (phase (T-S)//2 mod s), so the result does not depend on the
tile size (the margin covers the whole measured receptive field, so no tile-edge padding reaches a used feature).

Why dense and naive differ, and by how much (measured; see tests/test_infer.py and benchmarks/bench_infer.py)
----------------------------------------------------------------------------------------------------------
1. **Context vs zero padding.** In the naive path every convolution pads the window's border with zeros, so the
   feature cells near the window edge see an artificial frame; in the dense path the same cells see the real
   neighbouring tissue, up to the trunk's receptive-field margin beyond the window. Interior decisions agree;
   windows that straddle an area (or tissue) boundary can flip, because dense leans towards the neighbour that its
   edge cells see. The size of the effect is set by (receptive-field margin) / S and by the fraction of
   feature cells that touch the window border (all of them for S/s = 2). Measured on tests/test_infer.py's
   section (448x1536 px, 3 areas, S=64, T=16, classifiers trained ~60 steps on the synthetic textures):

   ==========================================  =====  ========  ==========  ===========  =================
   trunk                                        s     RF margin  agreement   max |Δp|     mean |Δp|
   ==========================================  =====  ========  ==========  ===========  =================
   plain CNN, 4 stride-2 3x3 convs (the test)   16    15 px      99.2 %      0.39         0.026
   same, T=8 (snapping, see 2.)                 16    15 px      99.2 %      0.58         0.025
   cytonet.nn.models.SmallResNet (demo encoder)    32    95 px      95.8 %      0.99         0.041
   ==========================================  =====  ========  ==========  ===========  =================

   Every disagreement lies within ~20 px of an area or tissue boundary. With random-init heads probabilities are
   near-uniform (Δp ~ 0.004 in benchmarks/bench_infer.py) and argmax is noise, hence the trained test model.
   Test bounds: agreement >= 99 %, max |Δp| < 0.5 (0.75 with snapping), mean |Δp| < 0.05; max |Δp| is a tail
   statistic of boundary windows whose classifier output is steep, so it is bounded loosely, the mean tightly.
   **Consequence for the demo config** (64-px windows, small encoder: S/s = 2, margin 95 px > S): dense maps are
   visibly more context-smoothed than the per-window classifier near boundaries; prefer ``mode="naive"`` there
   (it is cheap at demo scale) or windows >= 4x the margin. At cluster scale (S = 2048, s = 32, ResNet-50 margin
   ~213 px) only the outer ring of a 64x64-cell window is affected and the two paths agree closely.
2. **Snapping.** Windows start at (T-S)//2 + iT; dense pooling can only start at feature-cell boundaries, so when
   T is not a multiple of s the pooled box is shifted by up to s/2 px (rounded to the nearest cell). With T a
   multiple of s (the cluster case: T=32, s=32) there is no snapping at all (dense == naive to 6e-8 for a
   padding-free trunk; checked). With T=8, s=16 the extra max |Δp| is shown in the table above.
3. Float summation order (tile sizes, batch shapes): ~1e-6, irrelevant.
4. **A smaller halo** (``halo_px``, e.g. 0): the tile then carries only the window's S/2 on each side, and the
   feature cells at a tile's outer edge see zero padding beyond it, exactly as a naive window's edge cells do.
   So windows at tile edges move part-way from the dense towards the naive result (never further), maps are no
   longer independent of the tile size, and the trunk runs over (C + S)² instead of (C + S + 2·margin)² pixels
   per tile core C: for ResNet-50 (margin 224 px after rounding to cells) at S = 256 that is 1.8× less work on a
   1024 px core. tests/test_infer.py checks that the maps stay within the dense-naive agreement (>= 99 %).

Jobs, ranks and the input pipeline
----------------------------------
``cytonet infer`` maps a batch of sections (repeat ``--image``/``--mask``/``--name``) with every
``--classifier``/``--out`` pair, one process (rank) per GPU: srun tasks or torchrun workers, or ``--nproc N``
processes spawned here; rank r of W maps sections r, r+W, ... on ``cuda:LOCAL_RANK`` (CPU: threads split over the
ranks) and loads each model once (:mod:`cytonet.mapping.ranks`). The workflow runs one such job per
``infer.sections_per_job`` sections of a brain (:mod:`cytonet.mapping.batch` for its manifests).
Within a section (:func:`_map_blocks`, :mod:`cytonet.mapping.pipeline`), a reader thread reads tiles a few ahead
(``prefetch``, bounded queue; pinned memory on CUDA, copied to the GPU with ``non_blocking``) while this thread runs
the network under ``torch.inference_mode`` (bf16 autocast on CUDA). Label/entropy blocks and Zarr writes stay in
this thread (a writer thread measured slower on CPU); on CUDA results come back by an asynchronous copy into
pinned memory and a group is written while the GPU computes the next one. So a section's wall time approaches
max(read, compute + write) instead of read + compute + write (benchmarks/bench_infer_pipeline.py).
``tile_batch`` > 1 runs several dense tiles through the trunk at once: tiles are zero-padded at their far edges to
one of at most 16 shapes (quarters of the full tile), and the padding lies beyond the receptive-field halo, so
maps stay tile-independent (with ``halo_px`` below the margin the bottom/right tile edges then see PAD_VALUE
instead of the convolutions' zero padding). ``channels_last`` converts the trunk and its inputs to NHWC: by
default on the CPU, where it measured 1.2-3x faster for 1-channel input, not on CUDA (unmeasured). None of these
changes a map beyond float rounding; prefetching changes nothing at all (tests/test_infer.py).

Outputs (``<out>/<name>...``, each written to a temp path first and renamed; ``<name>_infer.json`` last)
-------------------------------------------------------------------------------------------------------
- ``<name>.ome.zarr``: OME-NGFF **0.5** (Zarr v3; read by ``ome-zarr`` >= 0.12 / napari-ome-zarr), a multiscale
  image of class probabilities float32 (c, y, x) (c = one channel per area in area-table order; NaN outside
  tissue), axes c:channel, y/x:space in micrometer; ``scale`` = physical pixel size of each level (output_um·2^l),
  ``translation`` puts cell centres in the section image's pixel-centre frame; ``omero`` channels carry area names
  and colours. ``labels/areas``: NGFF image-label (uint8, or uint16 when ids >= 255) with area colours and names.
  ``entropy``: a second NGFF image (y, x) float32 normalised entropy in [0, 1] (NaN outside tissue).
- ``<name>_areas.png``: the label map on the output grid, palette-indexed uint8 (pixel value = area id, 0 = outside
  tissue, :data:`cytonet.io.maps.UNCERTAIN_U8` = 255 where max p < ``uncertain_below``); uint16 grey PNG when
  ids >= 255 (then uncertain = 65535).
- ``<name>_entropy.tif``: float32 normalised entropy (ImageJ TIFF with the pixel size).
- ``<name>_overlay.png``: area map blended over the section thumbnail with a legend; uncertain = grey, hatched.
- ``<name>_infer.json``: parameters, area table, timings (read, compute, write and wall seconds of the tile loop).
  Its presence marks the outputs complete. With ``--batch-manifest PATH`` (a workflow batch job) it is staged
  instead and gathered into PATH, written last; the workflow publishes each section's copy from there.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cytonet.io.maps import SectionMapWriter, thumbnail
from cytonet.mapping.pipeline import Prefetcher
from cytonet.nn.models import autocast

log = logging.getLogger(__name__)

PAD_VALUE = 0  # outside the image: zeros, as readers.region and the patch extractor pad training patches


class InferenceError(ValueError):
    """Bad input to inference; the message names the file."""


# --------------------------------------------------------------------------------------------- model interface
def default_preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W] / [N,1,H,W] -> float [N,1,H,W]: the training normalisation (cytonet.nn.models.normalize_uint8)."""
    try:
        from cytonet.nn.models import normalize_uint8
    except ImportError:  # models not importable: same constants as models.PIXEL_MEAN / PIXEL_STD
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return ((x.unsqueeze(1) if x.ndim == 3 else x) - 0.5) / 0.25
    return normalize_uint8(x)


@dataclass
class DenseModel:
    """A patch classifier split at its global average pool (see module docstring)."""

    trunk: nn.Module
    head: nn.Module
    net_stride: int
    window_px: int
    pixel_size_um: float
    area_ids: list[int]
    area_names: list[str]
    preprocess: Callable[[torch.Tensor], torch.Tensor] = default_preprocess
    source: str = "<model object>"
    _rf_margin: int | None = field(default=None, repr=False)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of whole windows (the classifier's own forward): head(mean(trunk(x)))."""
        return self.head(self.trunk(x).mean(dim=(2, 3)))

    def rf_margin_px(self) -> int:
        """Pixels the trunk's receptive field reaches beyond a feature cell's own s×s block (measured, cached)."""
        if self._rf_margin is None:
            self._rf_margin = measure_rf_margin(self.trunk, self.net_stride)
        return self._rf_margin


class _TorchvisionTrunk(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                  net.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _split_backbone(backbone: nn.Module) -> tuple[nn.Module, int]:
    """(trunk, net_stride) of a backbone that ends with a global pool: torchvision ResNet or models.SmallResNet."""
    if all(hasattr(backbone, a) for a in ("conv1", "layer4")):
        return _TorchvisionTrunk(backbone), 32
    if hasattr(backbone, "stem") and hasattr(backbone, "layers"):
        trunk = nn.Sequential(backbone.stem, backbone.layers)
        return trunk, _stride_of(trunk)
    raise TypeError(f"cannot split {type(backbone).__name__} into trunk + pool; give trunk/head/net_stride")


def _stride_of(trunk: nn.Module, probe: int = 256) -> int:
    """Network stride by probing: input side / feature side."""
    p = next(trunk.parameters())
    with torch.no_grad():
        out = trunk.eval()(torch.zeros(1, 1, probe, probe, dtype=p.dtype, device=p.device))
    return probe // out.shape[-1]


def as_dense_model(model: Any, *, window_px: int, pixel_size_um: float, area_ids: Sequence[int],
                   area_names: Sequence[str], preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   source: str = "<model object>") -> DenseModel:
    """Adapt a classifier object to :class:`DenseModel` (torchvision ResNet, finetune.Classifier, trunk/head)."""
    if isinstance(model, DenseModel):
        return model
    if hasattr(model, "trunk") and hasattr(model, "head") and hasattr(model, "net_stride"):
        trunk, head, stride = model.trunk, model.head, int(model.net_stride)
    elif hasattr(model, "encoder") and hasattr(model, "head"):  # cytonet.nn.checkpoints.Classifier
        backbone = getattr(model.encoder, "backbone", model.encoder)
        trunk, stride = _split_backbone(backbone)
        head = model.head
    elif all(hasattr(model, a) for a in ("conv1", "layer4", "fc")):  # torchvision ResNet classifier
        trunk, stride = _split_backbone(model)
        head = model.fc
    else:
        raise TypeError(f"{source}: {type(model).__name__} has no trunk/head split; "
                        "see cytonet.mapping.infer.DenseModel")
    trunk.eval()
    head.eval()
    pre = preprocess or getattr(model, "preprocess", None) or default_preprocess
    return DenseModel(trunk, head, stride, int(window_px), float(pixel_size_um), [int(a) for a in area_ids],
                      [str(n) for n in area_names], pre, source)


def load_classifier(path: str | os.PathLike, pixel_size_um: float | None = None,
                    device: str = "cpu") -> DenseModel:
    """DenseModel from finetune's classifier.pt (format cytonet-classifier/1) or a torch-saved DenseModel."""
    path = Path(path)
    if path.is_dir():
        raise InferenceError(f"classifier checkpoint {path} is a folder; a model bundle is mapped with --model")
    if not path.is_file():
        raise InferenceError(f"classifier checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file
        raise InferenceError(f"classifier checkpoint {path}: cannot load ({exc})") from exc
    if isinstance(ck, DenseModel):
        ck.source = str(path)
        return ck
    if not isinstance(ck, dict) or "spec" not in ck or "area_ids" not in ck:
        raise InferenceError(f"classifier checkpoint {path}: not a cytonet classifier (no 'spec'/'area_ids')")
    from cytonet.nn.checkpoints import load_classifier as load_checkpoint

    model, ck = load_checkpoint(ck, device="cpu")
    um = ck.get("pixel_size_um") or (ck.get("config") or {}).get("pixel_size_um") or pixel_size_um
    if um is None:
        raise InferenceError(f"classifier checkpoint {path} has no 'pixel_size_um' (patch resolution); "
                             "pass --patch-um")
    names = ck.get("area_names") or [str(a) for a in ck["area_ids"]]
    return _classifier_dense_model(model, ck.get("patch_px"), ck.get("input_px"), float(um), ck["area_ids"], names,
                                   str(path))


def _classifier_dense_model(model: nn.Module, patch_px: int | None, input_px: int | None, um: float,
                            area_ids: Sequence[int], area_names: Sequence[str], source: str) -> DenseModel:
    """DenseModel of a trained cytonet.nn.checkpoints.Classifier (from classifier.pt or a model bundle)."""
    patch_px, input_px = int(patch_px or input_px), int(input_px or patch_px)
    # finetune resizes patch_px patches to input_px: the network sees input_px px at um*patch_px/input_px.
    return as_dense_model(model, window_px=input_px, pixel_size_um=um * patch_px / input_px, area_ids=area_ids,
                          area_names=area_names, source=source)


def load_bundle_model(path: str | os.PathLike, pixel_size_um: float | None = None, areas: Any = None,
                      device: str = "cpu") -> DenseModel:
    """DenseModel from a model bundle folder (``cytonet export-model``); its card must fit ``areas``."""
    from cytonet.io.model_card import card_areas
    from cytonet.nn.bundle import BundleError, load_bundle

    try:
        model, card = load_bundle(path, pixel_size_um=pixel_size_um, areas=areas, device=device)
    except BundleError as exc:
        raise InferenceError(str(exc)) from exc
    ids, names = [a[0] for a in card_areas(card)], [a[1] for a in card_areas(card)]
    return _classifier_dense_model(model, card["patch_px"], card["input_px"], float(card["pixel_size_um"]), ids,
                                   names, str(path))


@torch.no_grad()
def _rf_extent(trunk: nn.Module, stride: int, cells: int) -> tuple[int, int] | None:
    p = next(trunk.parameters())
    n = cells * stride
    c = cells // 2
    x = torch.randn(1, 1, n, n, dtype=p.dtype, device=p.device)
    with torch.enable_grad():
        x.requires_grad_(True)
        out = trunk(x)
        if out.shape[-1] != cells:
            raise ValueError(f"trunk gives {out.shape[-1]} cells for {n} px: net_stride is not {stride}")
        out[0, :, c, c].abs().sum().backward()
    g = x.grad[0, 0].abs().sum(0)  # over rows -> per column
    nz = torch.nonzero(g > 0).flatten()
    if len(nz) == 0:
        return None
    left = c * stride - int(nz[0])
    right = int(nz[-1]) - ((c + 1) * stride - 1)
    return left, right


def measure_rf_margin(trunk: nn.Module, stride: int) -> int:
    """Measured one-sided receptive-field margin (px) of the trunk's centre feature cell, via input gradients."""
    was_training = trunk.training
    trunk.eval()
    cells = 16
    try:
        while True:
            ext = _rf_extent(trunk, stride, cells)
            if ext is None:
                return 0
            margin = max(ext)
            if margin < (cells // 2 - 1) * stride or cells >= 128:  # the RF fits inside the probe: trust it
                return max(margin, 0)
            cells *= 2
    finally:
        trunk.train(was_training)


# ---------------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Grid:
    """Output grid geometry along both axes (all in pixels of the network resolution)."""

    height: int          # image size at network resolution
    width: int
    T: int               # output stride
    S: int               # window
    s: int               # net stride
    margin_cells: int    # receptive-field halo in feature cells

    @property
    def shape(self) -> tuple[int, int]:
        return math.ceil(self.height / self.T), math.ceil(self.width / self.T)

    @property
    def K(self) -> int:
        """Window footprint in feature cells."""
        return max(1, round(self.S / self.s))

    @property
    def phase(self) -> int:
        return ((self.T - self.S) // 2) % self.s

    def win0(self, i: np.ndarray) -> np.ndarray:
        """First pixel of the window of output cell(s) i."""
        return i * self.T + (self.T - self.S) // 2

    def cell(self, i: np.ndarray) -> np.ndarray:
        """Global feature cell where the (snapped) pooled box of output cell i starts."""
        return np.floor((self.win0(i) - self.phase) / self.s + 0.5).astype(np.int64)


def _blocks(n: int, b: int) -> list[tuple[int, int]]:
    return [(a, min(a + b, n)) for a in range(0, n, b)]


def _read(img: Any, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """(h, w) uint8 of a numpy/dask image, PAD_VALUE outside it (only the overlapping part is read)."""
    H, W = img.shape
    out = np.full((h, w), PAD_VALUE, np.uint8)
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
    if ya < yb and xa < xb:
        part = img[ya:yb, xa:xb]
        if hasattr(part, "compute"):
            part = part.compute(scheduler="threads")
        out[ya - y0:yb - y0, xa - x0:xb - x0] = np.asarray(part)
    return out


# --------------------------------------------------------------------------------------------------- inputs
def read_mask(mask: str | os.PathLike | np.ndarray, image_shape: tuple[int, int], where: str = "mask") -> np.ndarray:
    """Tissue mask as bool; must cover the same extent as the image (any coarser grid of the same aspect)."""
    if isinstance(mask, np.ndarray):
        m = mask
    else:
        where = str(mask)
        if not Path(mask).is_file():
            raise InferenceError(f"tissue mask {mask} does not exist")
        from PIL import Image

        try:
            m = np.asarray(Image.open(mask))
        except Exception as exc:  # noqa: BLE001
            raise InferenceError(f"tissue mask {mask}: cannot read ({exc})") from exc
    if m.ndim == 3:
        m = m[..., 0]
    H, W = image_shape
    # Same extent: mask side = image side / f for one factor f, up to rounding of each side (±1 px, 1 %).
    fy, fx = H / m.shape[0], W / m.shape[1]
    if abs(m.shape[1] - W / fy) > 1 + 0.01 * m.shape[1] or abs(m.shape[0] - H / fx) > 1 + 0.01 * m.shape[0]:
        raise InferenceError(f"tissue mask {where}: shape {m.shape} does not cover the image extent {H}x{W} "
                             f"(aspect {m.shape[0] / m.shape[1]:.4f} vs {H / W:.4f})")
    return m > 0


def _mask_on_grid(mask: np.ndarray, grid: Grid) -> np.ndarray:
    """Tissue flag per output cell: the mask pixel under the cell centre."""
    gh, gw = grid.shape
    cy = (np.arange(gh) * grid.T + grid.T / 2) / grid.height
    cx = (np.arange(gw) * grid.T + grid.T / 2) / grid.width
    iy = np.clip((cy * mask.shape[0]).astype(int), 0, mask.shape[0] - 1)
    ix = np.clip((cx * mask.shape[1]).astype(int), 0, mask.shape[1] - 1)
    return mask[np.ix_(iy, ix)]


def read_areas_table(path: str | os.PathLike) -> tuple[list[int], list[str], list[str]]:
    """(ids, names, colours) of an areas table; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"areas table {path} does not exist")
    try:
        from cytonet.io.tables import load_areas

        t = load_areas(path)
    except ImportError:  # pragma: no cover
        import pandas as pd

        t = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",").sort_values("area_id")
    except Exception as exc:  # noqa: BLE001
        raise InferenceError(f"areas table {path}: {exc}") from exc
    return [int(a) for a in t["area_id"]], [str(n) for n in t["name"]], [str(c) for c in t["color"]]


# ------------------------------------------------------------------------------------------------- compute
def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _Block:
    i0: int
    i1: int
    j0: int
    j1: int
    tissue: np.ndarray  # bool (i1-i0, j1-j0)


def _iter_blocks(grid: Grid, tissue: np.ndarray, block: int) -> Iterator[_Block]:
    gh, gw = grid.shape
    for i0, i1 in _blocks(gh, block):
        for j0, j1 in _blocks(gw, block):
            t = tissue[i0:i1, j0:j1]
            if t.any():
                # shrink to the tissue's bounding box: the dense trunk then skips background at section edges
                # (the full halo keeps the result independent of where a tile starts)
                rows, cols = np.nonzero(t.any(1))[0], np.nonzero(t.any(0))[0]
                a0, a1, b0, b1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
                yield _Block(i0 + a0, i0 + a1, j0 + b0, j0 + b1, t[a0:a1, b0:b1])


def _tile_px(grid: Grid, n: int) -> int:
    """Side in pixels of the dense tile (with halo) of n output cells."""
    c = grid.cell(np.array([0, n - 1]))
    return int((c[1] - c[0] + grid.K + 2 * grid.margin_cells) * grid.s)


@dataclass(frozen=True)
class PipelineOptions:
    """How the tiles of a section flow through the network (none of it changes the maps beyond float rounding).

    ``prefetch``: tiles a reader thread reads ahead (into pinned memory on CUDA) while the network runs;
    0 = read, compute and write in line (the serial baseline).
    ``tile_batch``: dense tiles per trunk call; above 1 every tile is zero-padded at its far edges to one of a few
    shapes (quarters of the full tile) so that tiles of one shape form a batch. With the full receptive-field
    halo no used feature sees the padding (module docstring); with a smaller ``halo_px`` the bottom/right tile
    edges then see PAD_VALUE instead of the convolutions' own zero padding.
    ``channels_last``: convert the trunk (and its inputs) to NHWC; None = on the CPU only, where it measured
    1.2-3x faster for 1-channel input (docs/benchmarks.md); on CUDA it is unmeasured, so NCHW unless asked.
    """

    prefetch: int = 4
    tile_batch: int = 1
    channels_last: bool | None = None


@dataclass
class _Tile:
    """One block's input tile (uint8, maybe padded) and, for dense, its size and pooling cells in feature cells."""

    block: _Block
    data: Any                                  # dense: torch uint8 (h, w) (pinned on CUDA); naive: numpy
    cells: tuple[int, int] = (0, 0)            # dense: the tile's own size in feature cells (before padding)
    sel: tuple[torch.Tensor, torch.Tensor] | None = None  # dense: feature cell where each output row/column pools


def _dense_geometry(grid: Grid, b: _Block) -> tuple[int, int, int, int, np.ndarray, np.ndarray]:
    """(first feature cell y, x, tile cells h, w, pooling cell of each output row, column) of a block's tile."""
    K, M = grid.K, grid.margin_cells
    cy, cx = grid.cell(np.arange(b.i0, b.i1)), grid.cell(np.arange(b.j0, b.j1))
    ky0, kx0 = int(cy[0] - M), int(cx[0] - M)
    # Tiles at the grid's end are smaller (only the cells needed); the full halo keeps results tile-independent.
    return ky0, kx0, int(cy[-1] + K + M - ky0), int(cx[-1] + K + M - kx0), cy - ky0, cx - kx0


def _padded_cells(grid: Grid, block: int) -> Callable[[int, int], tuple[int, int]]:
    """Tile size (cells) -> padded size: the next quarter of the largest tile a block can need (<= 16 shapes)."""
    gh, gw = grid.shape
    full = [int(math.ceil((min(block, n) - 1) * grid.T / grid.s)) + grid.K + 2 * grid.margin_cells
            for n in (gh, gw)]

    def pad(hc: int, wc: int) -> tuple[int, int]:
        out = []
        for n, f in zip((hc, wc), full):
            q = -(-f // 4)
            out.append(max(n, min(f, -(-n // q) * q)))
        return out[0], out[1]

    return pad


def _read_tile(img: Any, grid: Grid, mode: str, pad: Callable[[int, int], tuple[int, int]] | None,
               pin: torch.device | None, b: _Block) -> _Tile:
    """The input tile of a block (run in the reader thread): dense with its halo, naive with its windows.

    ``pin``: the CUDA device the tile goes to; dense tiles and their pooling indices then land in pinned memory,
    so that their copies to the GPU are asynchronous (a pageable copy would wait for the GPU's queue).
    """
    if mode == "naive":
        y0, x0 = int(grid.win0(np.int64(b.i0))), int(grid.win0(np.int64(b.j0)))
        ni, nj = b.i1 - b.i0, b.j1 - b.j0
        return _Tile(b, _read(img, y0, x0, (ni - 1) * grid.T + grid.S, (nj - 1) * grid.T + grid.S))
    s = grid.s
    ky0, kx0, hc, wc, sy, sx = _dense_geometry(grid, b)
    tile = _read(img, grid.phase + ky0 * s, grid.phase + kx0 * s, hc * s, wc * s)
    if pad is not None:
        ph, pw = pad(hc, wc)
        tile = np.pad(tile, ((0, (ph - hc) * s), (0, (pw - wc) * s)), constant_values=PAD_VALUE)
    data, sel = torch.from_numpy(tile), (torch.from_numpy(sy), torch.from_numpy(sx))
    if pin is not None:
        with torch.cuda.device(pin):  # the current device is per thread: no CUDA context on another rank's GPU
            data, sel = data.pin_memory(), (sel[0].pin_memory(), sel[1].pin_memory())
    return _Tile(b, data, (hc, wc), sel)


def _dense_group(model: DenseModel, grid: Grid, tiles: list[_Tile], dev: torch.device,
                 channels_last: bool) -> torch.Tensor:
    """Probabilities [sum of ni*nj, A] of tiles of one shape, tile after tile, via one trunk pass over all."""
    s, K = grid.s, grid.K
    x = model.preprocess(torch.stack([t.data.to(dev, non_blocking=True) for t in tiles]))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(dev):
        feat = model.trunk(x)
        if feat.shape[-2:] != (x.shape[-2] // s, x.shape[-1] // s):
            raise RuntimeError(f"trunk returned {tuple(feat.shape[-2:])} cells for a {x.shape[-2]}x{x.shape[-1]} "
                               f"tile; expected {(x.shape[-2] // s, x.shape[-1] // s)} (net_stride {s} wrong?)")
        rows = []
        for k, t in enumerate(tiles):
            hc, wc = t.cells
            # box filter over the tile's own cells (padding cut off): pooled[a] = mean(feat[a:a+K])
            pooled = F.avg_pool2d(feat[k:k + 1, :, :hc, :wc].float(), K, stride=1)[0]
            sy, sx = (v.to(dev, non_blocking=True) for v in t.sel)
            rows.append(pooled[:, sy][:, :, sx].permute(1, 2, 0).reshape(len(sy) * len(sx), -1))
        logits = model.head(torch.cat(rows))
    return torch.softmax(logits.float(), dim=1)


def _naive_tile(model: DenseModel, grid: Grid, t: _Tile, dev: torch.device, batch: int,
                channels_last: bool) -> np.ndarray:
    """Probabilities [ni, nj, A] of one block (NaN outside tissue), one network run per tissue window."""
    S, b, tile = grid.S, t.block, t.data
    ni, nj = b.i1 - b.i0, b.j1 - b.j0
    li, lj = np.nonzero(b.tissue)
    out = np.full((ni, nj, len(model.area_ids)), np.nan, np.float32)
    for a in range(0, len(li), batch):
        wy, wx = li[a:a + batch] * grid.T, lj[a:a + batch] * grid.T
        wins = np.stack([tile[y:y + S, x:x + S] for y, x in zip(wy, wx)])
        x = model.preprocess(torch.from_numpy(wins).to(dev, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev):
            logits = model.classify(x)
        out[li[a:a + batch], lj[a:a + batch]] = torch.softmax(logits.float(), 1).cpu().numpy()
    return out


def _to_host(p: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(CPU copy of p, an event to wait for): on CUDA an asynchronous copy into pinned memory."""
    if p.device.type != "cuda":
        return p, None
    host = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
    host.copy_(p, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(p.device))
    return host, done


def _write_group(maps: SectionMapWriter, tiles: list[_Tile], host: torch.Tensor, done: Any) -> None:
    """Write the probabilities of a group of tiles: wait for their copy to the host, split them per block."""
    if done is not None:
        done.synchronize()
    p, at = host.numpy(), 0
    for t in tiles:
        b = t.block
        n = (b.i1 - b.i0) * (b.j1 - b.j0)
        maps.write(b.i0, b.j0, p[at:at + n].reshape(b.i1 - b.i0, b.j1 - b.j0, -1), b.tissue)
        at += n


@dataclass
class InferenceResult:
    """What infer_section produced: paths plus the in-memory output-grid maps (small: output grid only)."""

    out_dir: Path
    paths: dict[str, Path]
    grid_shape: tuple[int, int]
    output_um: float
    seconds: float
    n_locations: int
    n_tiles: int
    timings: dict[str, float] = field(default_factory=dict)  # read_s, compute_s, write_s, map_s (_map_blocks)


def _prepare_image(image: Any, pixel_size_um: float | None, net_um: float) -> tuple[Any, float, str, Any]:
    """(image at network resolution, its µm/px, a name for messages, Section or None)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 2 or image.dtype != np.uint8:
            raise InferenceError(f"image array must be uint8 (H, W), got {image.dtype} {image.shape}")
        um = pixel_size_um or net_um
        if abs(um / net_um - 1) > 0.01:
            import dask.array as da

            from cytonet.io.readers import downsample

            if um > net_um:
                raise InferenceError(f"image array at {um} µm/px is coarser than the network's {net_um} µm/px")
            return downsample(da.from_array(image, chunks=2048), net_um / um), um, "<array>", None
        return image, um, "<array>", None
    from cytonet.io.readers import SectionReadError, open_section

    if not Path(image).exists():
        raise InferenceError(f"section image {image} does not exist")
    try:
        sec = open_section(image, pixel_size_um=pixel_size_um)
        return sec.read(net_um), sec.pixel_size_um, str(image), sec
    except SectionReadError as exc:
        raise InferenceError(str(exc)) from exc
    except ValueError as exc:
        raise InferenceError(f"section image {image}: {exc}") from exc


def _resolve_model(classifier: str | os.PathLike | DenseModel | nn.Module, areas: str | os.PathLike | Sequence | None,
                   patch_um: float | None, window_px: int | None) -> tuple[DenseModel, list[dict[str, Any]]]:
    """The classifier as a DenseModel, and the areas (area_id, name, color) whose order its logits must follow."""
    area_src = str(areas) if isinstance(areas, (str, os.PathLike)) else "<areas list>"
    if isinstance(areas, (str, os.PathLike)):
        ids, names, colours = read_areas_table(areas)
    elif areas is not None:
        ids, names, colours = ([int(a[0]) for a in areas], [str(a[1]) for a in areas], [str(a[2]) for a in areas])
    if isinstance(classifier, (str, os.PathLike)) and Path(classifier).is_dir():  # a model bundle
        model = load_bundle_model(classifier, pixel_size_um=patch_um, areas=areas)
    elif isinstance(classifier, (str, os.PathLike)):
        model = load_classifier(classifier, pixel_size_um=patch_um)
    elif isinstance(classifier, DenseModel):
        model = classifier
    else:
        if not isinstance(classifier, DenseModel) and (patch_um is None or window_px is None or areas is None):
            raise InferenceError("a model object needs patch_um, window_px and areas (or pass a DenseModel)")
        model = as_dense_model(classifier, window_px=window_px or 0, pixel_size_um=patch_um or 0.0,
                               area_ids=ids, area_names=names)
    if areas is None:  # the model's own areas, tab10 colours
        import matplotlib

        ids, names = list(model.area_ids), list(model.area_names)
        colours = [matplotlib.colors.to_hex(matplotlib.colormaps["tab10"](k % 10)) for k in range(len(ids))]
    if list(model.area_ids) != ids:
        raise InferenceError(f"classifier {model.source} predicts areas {model.area_ids} "
                             f"({', '.join(model.area_names)}) but the areas table {area_src} has {ids}")
    return model, [{"area_id": i, "name": n, "color": c} for i, n, c in zip(ids, names, colours)]


def _plan_grid(model: DenseModel, img: Any, mask: str | os.PathLike | np.ndarray, output_um: float,
               halo_px: int | None, mode: str) -> tuple[Grid, np.ndarray, float, int]:
    """(output grid, tissue flag per output cell, output µm snapped to the network grid, halo px) of a section."""
    net_um = model.pixel_size_um
    T = max(1, round(output_um / net_um))
    if abs(T * net_um / output_um - 1) > 0.01:
        log.warning("output_um %.3g is not a multiple of the network's %.3g µm/px; using %.4g", output_um, net_um,
                    T * net_um)
    output_um = T * net_um
    S, s = model.window_px, model.net_stride
    if S % s:
        log.warning("window %d px is not a multiple of the net stride %d: dense pools %d cells", S, s, round(S / s))
    if halo_px is not None and halo_px < 0:
        raise InferenceError(f"halo_px must be >= 0 or None (the receptive-field margin), got {halo_px}")
    margin = (model.rf_margin_px() if halo_px is None else int(halo_px)) if mode == "dense" else 0
    grid = Grid(int(img.shape[0]), int(img.shape[1]), T, S, s, -(-margin // s))
    tissue = _mask_on_grid(read_mask(mask, (int(img.shape[0]), int(img.shape[1]))), grid)
    return grid, tissue, output_um, margin


def _log_tiles(name: str, done: int, total: int, t0: float) -> None:
    """A log line at about every 10 % of a section's tiles: tiles done, elapsed time, rate."""
    if done == total or done * 10 // total > (done - 1) * 10 // total:
        elapsed = time.perf_counter() - t0
        log.info("infer %s: %d/%d tiles, %.1f s elapsed, %.2f tiles/s", name, done, total, elapsed,
                 done / max(elapsed, 1e-9))


def _map_blocks(model: DenseModel, img: Any, grid: Grid, blocks: list[_Block], mode: str, dev: torch.device,
                batch: int, maps: SectionMapWriter, name: str, progress: bool, opts: PipelineOptions,
                block: int) -> tuple[int, dict[str, float]]:
    """Probabilities of every block into ``maps``: a reader thread reads tiles ahead of the network (this thread).

    Writes stay in this thread (a writer thread measured slower on CPU: it competes with the reader and the
    network for the GIL and memory bandwidth); on CUDA a group's results are written while the GPU computes the
    next group (asynchronous copy back, waited for at write time). Returns the pixels the network ran over (dense
    tiles with halo and padding, naive windows) and the seconds spent reading, computing and writing, against
    the wall time of the whole loop.
    """
    pad = _padded_cells(grid, block) if mode == "dense" and opts.tile_batch > 1 else None
    read = partial(_read_tile, img, grid, mode, pad, dev if dev.type == "cuda" else None)
    sec = {"compute_s": 0.0, "write_s": 0.0}
    trunk_px, done, t0 = 0, 0, time.perf_counter()
    pending: dict[tuple[int, ...], list[_Tile]] = {}  # dense tiles waiting for a full batch of their shape
    unwritten: list[tuple] = []  # CUDA: the previous group, written once the next one is queued on the GPU

    def timed(key: str, fn: Callable[..., Any], *args: Any) -> Any:
        c0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            sec[key] += time.perf_counter() - c0

    def tiles_done(n: int) -> None:
        nonlocal done
        for _ in range(n):
            done += 1
            _log_tiles(name, done, len(blocks), t0)

    def run_dense(group: list[_Tile]) -> None:
        nonlocal trunk_px
        host, event = timed("compute_s", lambda: _to_host(_dense_group(model, grid, group, dev,
                                                                       opts.channels_last)))
        unwritten.append((maps, group, host, event))
        while len(unwritten) > (0 if event is None else 1):
            timed("write_s", _write_group, *unwritten.pop(0))
        trunk_px += sum(int(t.data.numel()) for t in group)
        tiles_done(len(group))

    on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with on_device, Prefetcher(blocks, read, opts.prefetch, name=f"read {name}") as tiles, torch.inference_mode():
        it: Any = tiles
        if progress:
            from cytonet.io.logs import progress as progress_bar  # a bar only on a terminal

            it = progress_bar(tiles, desc=f"infer {name} ({mode})", unit="tile", total=len(blocks))
        for t in it:
            if mode == "naive":
                p = timed("compute_s", _naive_tile, model, grid, t, dev, batch, opts.channels_last)
                timed("write_s", maps.write, t.block.i0, t.block.j0, p, t.block.tissue)
                trunk_px += int(t.block.tissue.sum()) * grid.S * grid.S
                tiles_done(1)
                continue
            group = pending.setdefault(tuple(t.data.shape), [])
            group.append(t)
            if len(group) >= opts.tile_batch:
                run_dense(pending.pop(tuple(t.data.shape)))
        for group in list(pending.values()):
            run_dense(group)
        while unwritten:
            timed("write_s", _write_group, *unwritten.pop(0))
    timings = {"read_s": tiles.busy_s, **sec, "map_s": time.perf_counter() - t0}
    return trunk_px, {k: round(v, 3) for k, v in timings.items()}


def infer_section(image: str | os.PathLike | np.ndarray, mask: str | os.PathLike | np.ndarray,
                  classifier: str | os.PathLike | DenseModel | nn.Module, areas: str | os.PathLike | Sequence | None,
                  out_dir: str | os.PathLike, *, name: str | None = None, pixel_size_um: float | None = None,
                  output_um: float = 64.0, uncertain_below: float = 0.5, tile_px: int = 2048,
                  mode: str = "dense", halo_px: int | None = None, device: str | None = None,
                  batch_size: int | None = None, patch_um: float | None = None, window_px: int | None = None,
                  pyramid_levels: int = 4, progress: bool = True, overlay: bool = True,
                  pipeline: PipelineOptions | None = None,
                  manifest_path: str | os.PathLike | None = None) -> InferenceResult:
    """Map one section: probabilities (OME-Zarr), label + entropy maps, overlay PNG; see the module docstring.

    ``classifier``: a checkpoint path, a model bundle folder, or a model (DenseModel, finetune.Classifier,
    torchvision ResNet; then give ``patch_um`` and ``window_px``). ``areas``: areas table path, a list of
    (id, name, '#rrggbb'), or None to take the areas of a DenseModel / checkpoint with tab10 colours.
    ``tile_px``: tile core side in input pixels at the network resolution (sets peak memory).
    ``halo_px``: dense context beyond the windows at a tile's edge; None = the measured receptive-field margin
    (tile-independent results), smaller = faster, with windows at tile edges part-way to naive (module docstring).
    ``pipeline``: prefetching, tile batches, channels_last (:class:`PipelineOptions`). ``manifest_path``: where
    the manifest goes instead of ``<out_dir>/<name>_infer.json`` (a batch job stages it; cytonet.mapping.batch).
    Logs a line when the section starts and ends and at about every 10 % of its tiles.
    """
    t_start = time.perf_counter()
    if mode not in ("dense", "naive"):
        raise InferenceError(f"mode must be dense or naive, got {mode!r}")
    opts = pipeline or PipelineOptions()
    if opts.prefetch < 0 or opts.tile_batch < 1:
        raise InferenceError(f"prefetch must be >= 0 and tile_batch >= 1, got {opts.prefetch}, {opts.tile_batch}")
    model, area_rows = _resolve_model(classifier, areas, patch_um, window_px)
    dev = _device(device)
    if opts.channels_last is None:  # auto: NHWC where it was measured to pay (the CPU; docs/benchmarks.md)
        opts = replace(opts, channels_last=dev.type == "cpu")
    model.trunk.to(dev).eval()
    model.head.to(dev).eval()
    model.trunk.to(memory_format=torch.channels_last if opts.channels_last else torch.contiguous_format)

    net_um = model.pixel_size_um
    img, image_um, img_where, sec = _prepare_image(image, pixel_size_um, net_um)
    grid, tissue, output_um, margin = _plan_grid(model, img, mask, output_um, halo_px, mode)
    T, S, s = grid.T, grid.S, grid.s
    gh, gw = grid.shape
    block = max(1, tile_px // T)  # output cells per tile side
    batch = batch_size or max(1, (1 << 22) // (S * S))  # ~4 Mpx of windows per naive batch

    name = name or (Path(image).name.split(".")[0] if not isinstance(image, np.ndarray) else "section")
    with SectionMapWriter(out_dir, name, (gh, gw), area_rows, uncertain_below, block, "infer") as maps:
        if manifest_path is not None:
            maps.manifest = Path(manifest_path)
        blocks = list(_iter_blocks(grid, tissue, block))
        log.info("infer %s (%s, %s): %d tiles, grid %dx%d at %g µm, %d tissue cells", name, mode, dev, len(blocks),
                 gh, gw, output_um, int(tissue.sum()))
        trunk_px, timings = _map_blocks(model, img, grid, blocks, mode, dev, batch, maps, name, progress, opts, block)
        thumb = thumbnail(img if sec is None else sec, net_um, output_um, image_um) if overlay else None
        seconds = time.perf_counter() - t_start
        final = maps.finish(output_um, image_um, pyramid_levels, thumb, {
            "image": img_where, "mode": mode, "classifier": model.source, "network_pixel_size_um": net_um,
            "window_px": S, "net_stride": s, "output_stride_px": T, "rf_margin_px": margin, "tile_px": tile_px,
            "n_tiles": len(blocks), "trunk_px": trunk_px, "device": str(dev), "tile_batch": opts.tile_batch,
            "prefetch": opts.prefetch, "channels_last": opts.channels_last, "timings": timings,
            "seconds": round(seconds, 3)})
    log.info("infer %s: done, %d tiles in %.1f s (read %.1f s, compute %.1f s, write %.1f s) -> %s", name,
             len(blocks), time.perf_counter() - t_start, timings["read_s"], timings["compute_s"], timings["write_s"],
             out_dir)
    return InferenceResult(Path(out_dir), final, (gh, gw), output_um, seconds, int(tissue.sum()), len(blocks),
                           timings)


# ------------------------------------------------------------------------------------------------------ CLI
def _pixel_size(value: str) -> float | None:
    """--pixel-size value: µm per pixel, or 'auto' for the image metadata."""
    if value.lower() == "auto":
        return None
    try:
        um = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pixel size in µm or 'auto': {value!r}") from None
    if um <= 0:
        raise argparse.ArgumentTypeError(f"pixel size must be > 0, got {value}")
    return um


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet infer``."""
    parser.add_argument("--image", required=True, action="append",
                        help="section image (tiled TIFF, OME-Zarr, PNG); repeat with --mask (and --name) to map "
                             "a batch of sections in one job")
    parser.add_argument("--mask", required=True, action="append",
                        help="tissue mask PNG (0/255, same extent as the image), one per --image")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--classifier", action="append",
                       help="classifier checkpoint (finetune's classifier.pt); repeat with --out to map the "
                            "sections with several models in one process")
    which.add_argument("--model", action="append", metavar="BUNDLE",
                       help="model bundle folder (cytonet export-model) instead of a classifier.pt; its card must "
                            "name the areas of --areas (repeat with --out like --classifier)")
    parser.add_argument("--areas", required=True, help="areas table (area_id, name, color)")
    parser.add_argument("--out", required=True, action="append",
                        help="output folder (one per --classifier or --model)")
    parser.add_argument("--name", action="append", help="output name, one per --image (default: image file stem)")
    parser.add_argument("--pixel-size", type=_pixel_size, action="append",
                        help="image pixel size in µm when its metadata has none: once for every --image, or once "
                             "per --image ('auto': from the metadata)")
    parser.add_argument("--patch-um", type=float, help="training patch resolution, if the checkpoint lacks it "
                        "(with --model: the resolution the bundle must have been trained at)")
    parser.add_argument("--output-um", type=float, default=64.0, help="output grid spacing in µm (default 64)")
    parser.add_argument("--uncertain-below", type=float, default=0.5,
                        help="label 'uncertain' where the top probability is below this (default 0.5)")
    parser.add_argument("--tile-px", type=int, default=2048, help="tile side in network pixels (sets peak memory)")
    parser.add_argument("--mode", choices=("dense", "naive"), default="dense")
    parser.add_argument("--halo-px", type=int, help="dense: context px beyond the windows at tile edges "
                        "(default: the trunk's measured receptive-field margin, tile-independent results)")
    parser.add_argument("--tile-batch", type=int, default=1,
                        help="dense: tiles per trunk call; > 1 pads tiles to a few fixed shapes (default 1)")
    parser.add_argument("--prefetch", type=int, default=4,
                        help="tiles a reader thread reads ahead of the network (0: read, compute, write in line)")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="trunk in NHWC memory format (auto: on the CPU, where it measured faster; not on CUDA)")
    parser.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--batch-size", type=int, help="windows per batch in naive mode")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks to spawn here (one per GPU); ignored when srun or torchrun started the ranks")
    parser.add_argument("--threads", type=int, help="torch CPU threads per rank; ranks spawned with --nproc share "
                        "them (default: the cores split over the ranks of the node)")
    parser.add_argument("--batch-manifest", metavar="PATH",
                        help="stage each section's manifest and gather them into PATH, written last "
                             "(the workflow's multi-section jobs; cytonet.mapping.batch)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _per_section(values: list | None, n: int, flag: str, allow_one: bool = False) -> list:
    """Values of a per-section option: one per --image (or one for all with ``allow_one``)."""
    values = values or []
    if len(values) == n or (allow_one and len(values) == 1):
        return values * n if len(values) == 1 and n > 1 else values
    allowed = f"{n}" + (" or 1" if allow_one else "")
    raise InferenceError(f"{len(values)} {flag} for {n} --image; give {allowed} (one per --image, in the same order)")


def job_from_args(args: argparse.Namespace) -> Any:
    """The :class:`cytonet.mapping.ranks.InferJob` of the command line; InferenceError on mismatched counts."""
    from cytonet.mapping.ranks import InferJob, SectionSpec

    n = len(args.image)
    masks = _per_section(args.mask, n, "--mask")
    names = _per_section(args.name, n, "--name") if args.name else [Path(i).name.split(".")[0] for i in args.image]
    sizes = _per_section(args.pixel_size, n, "--pixel-size", allow_one=True) if args.pixel_size else [None] * n
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise InferenceError(f"section name(s) {', '.join(dup)} given twice: each section needs its own --name")
    option, models = ("--classifier", args.classifier) if args.classifier else ("--model", args.model)
    if len(models) != len(args.out):
        raise InferenceError(f"{len(models)} {option} but {len(args.out)} --out; give one output folder per "
                             f"{option}")
    if args.nproc < 1:
        raise InferenceError(f"--nproc must be >= 1, got {args.nproc}")
    nhwc = {"auto": None, "on": True, "off": False}[args.channels_last]
    pipeline = PipelineOptions(prefetch=args.prefetch, tile_batch=args.tile_batch, channels_last=nhwc)
    options = dict(output_um=args.output_um, uncertain_below=args.uncertain_below, tile_px=args.tile_px,
                   mode=args.mode, halo_px=args.halo_px, batch_size=args.batch_size, patch_um=args.patch_um,
                   progress=not args.no_progress, pipeline=pipeline)
    return InferJob(tuple(SectionSpec(i, m, nm, um) for i, m, nm, um in zip(args.image, masks, names, sizes)),
                    tuple(models), tuple(args.out), args.areas, option == "--model", options, args.device,
                    args.threads, args.batch_manifest)


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet infer``: every section with every (--classifier, --out) pair, sharded over the ranks."""
    from cytonet.mapping.ranks import run_job

    try:
        job = job_from_args(args)
    except InferenceError as exc:
        print(f"cytonet infer: error: {exc}", file=sys.stderr)
        return 2
    verbosity = getattr(args, "log_verbose", 0) - getattr(args, "log_quiet", 0)
    return run_job(job, args.nproc, verbosity)
