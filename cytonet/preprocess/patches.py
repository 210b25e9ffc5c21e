"""Patch sampling and extraction into one sharded Zarr v3 patch store per brain.

Command line (``cytonet patches``)::

    cytonet patches --brain B --brains-table brains.csv --areas areas.csv --masks-dir results/masks/B \\
        --out results/patches/B --threads N [--dask JSON-or-file | --scheduler tcp://host:8786] \\
        [--params JSON-or-file] [--param key=value ...] [--no-progress]

Parameters (``--params`` takes a JSON object or a path to a JSON file; ``--param key=value`` overrides single
keys; an unknown key is an error naming it). Defaults match ``cytonet/schemas/config.schema.yaml``:

=====================  ========  ==================================================================================
key                    default   meaning
=====================  ========  ==================================================================================
patch_px               64        patch side S in pixels at ``pixel_size_um``
pixel_size_um          16.0      resolution (µm/px) the patches are cut at
count                  2000      patches per section or per brain (``count_per``); in grid mode an upper bound
count_per              brain     ``section`` or ``brain`` (brain: split over sections in proportion to tissue area)
sampling               random    ``random`` (uniform over valid centres) or ``grid`` (regular grid, step
                                 ``grid_stride_px``, evenly thinned to ``count``)
grid_stride_px         0         grid step in target pixels; 0 = ``patch_px`` (non-overlapping patches)
min_tissue_fraction    0.5       minimum fraction of tissue-mask pixels inside the patch footprint
seed                   0         random seed; each section draws from ``(seed, crc32(section_id))``
shard_patches          256       patches per Zarr shard (a task holds one shard in memory: k·S² bytes)
on_bad_section         error     ``error`` or ``skip`` (warn, record in ``<out>/qc.csv`` and go on)
=====================  ========  ==================================================================================

Sampling: centres lie in tissue (tissue mask > 0) or, for sections with an annotation, in annotated cortex
(label > 0); the whole footprint lies inside the image; the tissue fraction (mask pixels whose centres fall in
the footprint, via an integral image of the coarse mask) is at least ``min_tissue_fraction``. Patches sit on the
pixel grid of the target resolution, so a patch is exactly ``section.read(pixel_size_um)[ty0:ty0+S, tx0:tx0+S]``.

Coordinates: ``x_px``/``y_px`` are the patch centre in full-resolution pixel-index coordinates (pixel ``i`` has
its centre at ``i``; a footprint covering pixels ``[x0, x0+F)`` has its centre at ``x0 + F/2 - 0.5``); ``x_mm``,
``y_mm``, ``z_mm`` are ``SectionTransform.to_mm(x_px, y_px)``; ``area_id`` is the annotation label of the pixel
holding the centre.

Store layout (``--out`` directory)::

    patches.zarr/       Zarr v3 group; array "patches" uint8 [N, S, S], chunks (1, S, S), shards (k, S, S),
                        Zstd level 1 (much faster to write than Blosc-zstd-3, same ratio on
                        these images); attrs pixel_size_um, patch_px, brain
    patches.parquet     one row per patch, row i = patches[i] (columns in docs/contracts.md)
    qc.csv              section, file, problem (skipped sections; header only when none)
    manifest.json       written last, its presence marks the store complete

Everything is built in ``<out>/.staging-<pid>/`` and moved into place before the manifest is written; a killed
run leaves no manifest, and a rerun clears stale staging directories and old outputs first.

Parallelism: ``cytonet.preprocess.dask_cluster`` as set by ``--dask`` (the config's ``dask`` section): a
``LocalCluster`` of ``--threads`` single-threaded worker processes (``--threads 1`` runs in-process), or a dask-jobqueue
``SLURMCluster`` (``cluster: slurm``), or an existing scheduler (``--scheduler ADDRESS``). Each task writes whole
shards; it opens the section itself and reads tiles through a small LRU cache, so patches that share image tiles
decode them once.

Code: the sampling of positions is in :mod:`cytonet.preprocess.sampling`, the tile cache, resampling and the
worker tasks in :mod:`cytonet.preprocess.extraction`; this module holds the parameters, the brain-level driver
(inspect, sample, extract, publish), the store validation and the command line, and re-exports the public names.
Progress goes to the log: one line when the sampling is done, one per finished task (about every 10 % of the
tasks on large brains) with the patches written so far and the elapsed time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytonet.io.annotations import AnnotationError, is_set, load_labels, read_image
from cytonet.io.atomic import file_sha256
from cytonet.io.params import parse_params as read_params
from cytonet.preprocess.dask_cluster import (
    BackgroundClient,
    parse_dask_config,
    wants_cluster,
    worker_count,
)
from cytonet.preprocess.extraction import (
    CACHE_BYTES,
    READ_TILE_PX,
    TileCache,
    _default_opener,
    _extract_task,
    cut_patch,
    level_and_factor,
)
from cytonet.preprocess.sampling import PatchInputError, allocate_counts, sample_locations, section_rng

__all__ = ["DEFAULT_PARAMS", "TABLE_COLUMNS", "READ_TILE_PX", "CACHE_BYTES", "PatchInputError", "parse_params",
           "section_rng", "sample_locations", "allocate_counts", "TileCache", "cut_patch", "level_and_factor",
           "SectionInfo", "inspect_section", "extract_brain", "validate_store", "configure_parser", "run"]

log = logging.getLogger(__name__)

DEFAULT_PARAMS: dict[str, Any] = {
    "patch_px": 64,
    "pixel_size_um": 16.0,
    "count": 2000,
    "count_per": "brain",
    "sampling": "random",
    "grid_stride_px": 0,
    "min_tissue_fraction": 0.5,
    "seed": 0,
    "shard_patches": 256,
    "on_bad_section": "error",
}
_CHOICES = {"count_per": ("section", "brain"), "sampling": ("random", "grid"), "on_bad_section": ("error", "skip")}
TABLE_COLUMNS = ["index", "brain", "section", "x_px", "y_px", "x_mm", "y_mm", "z_mm", "area_id",
                 "tissue_fraction", "labelled"]


# ----------------------------------------------------------------------------------------------------------------
# params


def parse_params(params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults updated by ``params``; unknown keys and bad values raise ``ValueError`` naming the key."""
    out = dict(DEFAULT_PARAMS)
    for key, value in (params or {}).items():
        if key not in DEFAULT_PARAMS:
            raise ValueError(f"unknown patches parameter {key!r} (known: {', '.join(sorted(DEFAULT_PARAMS))})")
        default = DEFAULT_PARAMS[key]
        try:
            if isinstance(default, bool):
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            else:
                value = str(value)
        except (TypeError, ValueError):
            raise ValueError(f"patches parameter {key!r}: cannot use value {value!r}") from None
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ValueError(f"patches parameter {key!r} must be one of {_CHOICES[key]}, got {value!r}")
        out[key] = value
    for key in ("patch_px", "shard_patches", "count"):
        if out[key] < 1:
            raise ValueError(f"patches parameter {key!r} must be >= 1, got {out[key]}")
    if out["pixel_size_um"] <= 0:
        raise ValueError(f"patches parameter 'pixel_size_um' must be > 0, got {out['pixel_size_um']}")
    if not 0.0 <= out["min_tissue_fraction"] <= 1.0:
        raise ValueError(f"patches parameter 'min_tissue_fraction' must be in [0, 1], got {out['min_tissue_fraction']}")
    if out["grid_stride_px"] < 0:
        raise ValueError(f"patches parameter 'grid_stride_px' must be >= 0, got {out['grid_stride_px']}")
    return out



# ----------------------------------------------------------------------------------------------------------------
# brain-level driver


@dataclass
class SectionInfo:
    """What the driver knows about one section (no pixel data)."""

    section: str
    image: str
    pixel_size_um: float
    shape: tuple[int, int]
    mask_file: str
    annotation: str | None
    transform: Any
    tissue_area_um2: float = 0.0
    extra: dict = field(default_factory=dict)


def inspect_section(row: Any, masks_dir: str | os.PathLike, areas: pd.DataFrame, base_dir: str | os.PathLike,
                    opener: Callable | None = None) -> tuple[SectionInfo, np.ndarray, np.ndarray | None]:
    """Open one section's image (metadata only), mask and annotation; raise ``PatchInputError`` on bad input."""
    from cytonet.io.transforms import SectionTransform

    sid = str(row["section_id"])
    image = row["image"]
    if not is_set(image):
        raise PatchInputError(sid, None, "no image given")
    image = str(image)
    if not Path(image).exists():
        raise PatchInputError(sid, image, "image file not found")
    px = row.get("pixel_size_um")
    px = float(px) if is_set(px) else None
    opener = opener or _default_opener
    try:
        sec = opener(image, pixel_size_um=px, section_id=sid)
    except Exception as exc:  # noqa: BLE001 - SectionReadError or anything a broken file throws
        msg = str(exc)
        if "pixel size" in msg.lower() or "pixel_size" in msg.lower():
            raise PatchInputError(sid, image, f"missing pixel size: {msg}") from exc
        raise PatchInputError(sid, image, f"cannot read image (corrupt or truncated?): {msg}") from exc
    p0 = getattr(sec, "pixel_size_um", None)
    if p0 is None or not np.isfinite(float(p0)) or float(p0) <= 0:
        raise PatchInputError(sid, image, "missing pixel size: neither the image metadata nor the sections table "
                                          "(column pixel_size_um) gives one")
    shape = tuple(int(s) for s in sec.levels[0].shape[:2])
    mask_file = Path(masks_dir) / f"{sid}.png"
    if not mask_file.is_file():
        raise PatchInputError(sid, mask_file, "tissue mask not found")
    try:
        mask = read_image(mask_file)
    except Exception as exc:  # noqa: BLE001
        raise PatchInputError(sid, mask_file, f"cannot read tissue mask: {exc}") from exc
    if mask.ndim == 3:
        mask = mask[..., 0]
    if not (mask > 0).any():
        raise PatchInputError(sid, f"{image} (mask {mask_file})", "empty section: the tissue mask holds no tissue")
    annotation = row.get("annotation")
    labels = None
    if is_set(annotation):
        try:
            labels = load_labels(annotation, sid, areas, shape)
        except AnnotationError as exc:
            raise PatchInputError(sid, exc.path, exc.problem) from exc
    try:
        transform = SectionTransform.from_spec(row["transform"], base_dir)
    except Exception as exc:  # noqa: BLE001
        raise PatchInputError(sid, row["transform"], f"bad transform: {exc}") from exc
    area = float((mask > 0).mean()) * shape[0] * shape[1] * float(p0) ** 2
    info = SectionInfo(sid, image, float(p0), shape, str(mask_file), str(annotation) if labels is not None else None,
                       transform, area, {"pixel_size_override": px})
    return info, mask, labels



class _BadSections:
    """The ``on_bad_section`` policy: raise the error, or warn, log and record the section for qc.csv."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.qc: list[dict[str, str]] = []

    def __call__(self, err: PatchInputError) -> None:
        if self.policy == "error":
            raise err
        # called from the driver's steps: stacklevel 4 points at the caller of extract_brain
        warnings.warn(f"skipping {err}", stacklevel=4)
        log.warning("skipping %s", err)
        self.qc.append({"section": err.section, "file": err.file, "problem": err.problem})


class _Laps:
    """Seconds spent in each phase of the driver (the manifest's ``timings``)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.tick = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.tick, 3)
        self.tick = now


@dataclass
class _BrainInputs:
    """Where one brain's sections come from: their table, the areas, the masks, relative paths, the opener."""

    sections: pd.DataFrame
    areas: pd.DataFrame
    masks_dir: str | os.PathLike
    base_dir: str | os.PathLike
    opener: Callable | None

    def inspect(self, row: Any) -> tuple[SectionInfo, np.ndarray, np.ndarray | None]:
        return inspect_section(row, self.masks_dir, self.areas, self.base_dir, self.opener)


def _prepare_out(out: Path) -> Path:
    """Create ``out``, clear what a killed run may have left there, return a fresh staging folder."""
    out.mkdir(parents=True, exist_ok=True)
    # A previous run may have been killed: nothing it left can look complete, but clear it so outputs are fresh.
    (out / "manifest.json").unlink(missing_ok=True)
    for stale in out.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out / f".staging-{os.getpid()}"
    staging.mkdir()
    return staging


def _inspect_sections(inp: _BrainInputs, bad: _BadSections) -> tuple[list[SectionInfo], dict[str, tuple]]:
    """Pass 1: metadata of every section (and tissue area for per-brain counts); masks/labels kept while small."""
    infos: list[SectionInfo] = []
    cached: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    cached_bytes = 0
    for _, row in inp.sections.iterrows():
        try:
            info, mask, labels = inp.inspect(row)
        except PatchInputError as err:
            bad(err)
            continue
        infos.append(info)
        size = mask.nbytes + (labels.nbytes if labels is not None else 0)
        if cached_bytes + size <= 512 * 2**20:
            cached[info.section] = (mask, labels)
            cached_bytes += size
    return infos, cached


def _section_counts(p: dict[str, Any], infos: list[SectionInfo]) -> dict[str, int]:
    """Patches wanted per section: ``count`` each, or ``count`` split over the brain by tissue area."""
    if p["count_per"] == "brain":
        return allocate_counts(p["count"], {i.section: i.tissue_area_um2 for i in infos})
    return {i.section: p["count"] for i in infos}


def _sample_section(info: SectionInfo, mask: np.ndarray, labels: np.ndarray | None, count: int,
                    p: dict[str, Any]) -> pd.DataFrame:
    """Patch positions of one section (``sample_locations`` with the store's parameters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return sample_locations(mask, info.shape, p["patch_px"], p["pixel_size_um"] / info.pixel_size_um, count,
                                sampling=p["sampling"], min_tissue_fraction=p["min_tissue_fraction"], seed=p["seed"],
                                section_id=info.section, labels=labels, grid_stride_px=p["grid_stride_px"],
                                mask_file=info.mask_file)


def _add_plan_columns(df: pd.DataFrame, info: SectionInfo, labelled: bool, sec_index: int) -> None:
    """3D coordinates, section name, labelled flag and the section's index in the plan (``_sec``)."""
    xyz = info.transform.to_mm(df["x_px"].to_numpy(), df["y_px"].to_numpy())
    df["x_mm"], df["y_mm"], df["z_mm"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    df["section"] = info.section
    df["labelled"] = labelled
    df["_sec"] = sec_index


def _sample_sections(inp: _BrainInputs, infos: list[SectionInfo], cached: dict[str, tuple], counts: dict[str, int],
                     p: dict[str, Any], bad: _BadSections, brain: str) -> tuple[pd.DataFrame, list[SectionInfo]]:
    """Pass 2: sampling, section by section (masks and labels are coarse; one section in memory at a time)."""
    frames = []
    kept: list[SectionInfo] = []
    rows_by_sec = {str(r["section_id"]): r for _, r in inp.sections.iterrows()}
    for info in infos:
        if counts[info.section] == 0:
            continue
        try:
            if info.section in cached:
                mask, labels = cached.pop(info.section)
            else:
                _, mask, labels = inp.inspect(rows_by_sec[info.section])
            df = _sample_section(info, mask, labels, counts[info.section], p)
        except PatchInputError as err:
            bad(err)
            continue
        _add_plan_columns(df, info, labels is not None, len(kept))
        kept.append(info)
        frames.append(df)
    if not frames:
        raise PatchInputError("*", inp.masks_dir, f"brain '{brain}': no section gave any patch")
    return pd.concat(frames, ignore_index=True), kept


def _create_store(store_path: Path, n: int, p: dict[str, Any], brain: str) -> None:
    """An empty sharded Zarr v3 patch array of n patches (replacing any earlier attempt)."""
    import zarr
    from zarr.codecs import ZstdCodec

    S, k = p["patch_px"], p["shard_patches"]
    shutil.rmtree(store_path, ignore_errors=True)
    group = zarr.open_group(store_path, mode="w", zarr_format=3)
    group.attrs.update({"pixel_size_um": p["pixel_size_um"], "patch_px": S, "brain": brain})
    group.create_array("patches", shape=(n, S, S), dtype="uint8", chunks=(1, S, S),
                       shards=(min(k, n), S, S), compressors=ZstdCodec(level=1),
                       fill_value=0)


def _extract(plan: pd.DataFrame, kept: list[SectionInfo], p: dict[str, Any], staging: Path, starter: Any,
             workers: int, progress: bool, inp: _BrainInputs, bad: _BadSections, brain: str,
             laps: _Laps) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Write the patches into the staging store; a section that fails to decode mid-way is skipped (or raised)
    and the store rebuilt without it. Returns the plan of what was written and the task statistics."""
    S, k = p["patch_px"], p["shard_patches"]
    if k * S * S > 512 * 2**20:
        warnings.warn(f"shard_patches={k} with patch_px={S} holds {k * S * S / 2**20:.0f} MiB per task", stacklevel=3)
    client = None
    stats_total = {"decoded_bytes": 0, "tile_reads": 0}
    try:
        if starter is not None:
            client = starter.get()
        laps("cluster_wait_s")
        while True:
            store_path = staging / "patches.zarr"
            _create_store(store_path, len(plan), p, brain)
            error = _run_tasks(plan, kept, p, str(store_path / "patches"), client, workers, progress, inp.opener,
                               stats_total, brain)
            if error is None:
                break
            bad(PatchInputError(error["section"], error["file"], error["problem"]))
            plan = plan[plan["section"] != error["section"]].reset_index(drop=True)
            if plan.empty:
                raise PatchInputError("*", inp.masks_dir, f"brain '{brain}': no section gave any patch")
        laps("extract_s")
    finally:
        if starter is not None:
            starter.close()
    laps("cluster_close_s")
    return plan, stats_total


def _publish(out: Path, staging: Path, plan: pd.DataFrame, brain: str, qc: list[dict[str, str]]) -> pd.DataFrame:
    """Write the table and qc.csv into staging, then move store, table and QC into place; returns the table."""
    plan.insert(0, "index", np.arange(len(plan), dtype=np.int64))
    plan["brain"] = brain
    table = plan[TABLE_COLUMNS].astype({"area_id": np.int64, "labelled": bool})
    table.to_parquet(staging / "patches.parquet", index=False)
    pd.DataFrame(qc, columns=["section", "file", "problem"]).to_csv(staging / "qc.csv", index=False)
    for name in ("patches.zarr", "patches.parquet", "qc.csv"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(staging / name, target)
    shutil.rmtree(staging, ignore_errors=True)
    return table


def _write_manifest(out: Path, brain: str, table: pd.DataFrame, p: dict[str, Any], qc: list[dict[str, str]],
                    stats_total: dict[str, Any], timings: dict[str, float], t_start: float) -> dict[str, Any]:
    """Write manifest.json (last: its presence marks the store complete) and return it."""
    from cytonet import __version__ as version

    manifest = {
        "brain": brain,
        "n_patches": int(len(table)),
        "patch_px": p["patch_px"],
        "pixel_size_um": p["pixel_size_um"],
        "shard_patches": p["shard_patches"],
        "sections": {s: int(c) for s, c in table["section"].value_counts(sort=False).items()},
        "skipped_sections": [q["section"] for q in qc],
        "params": p,
        "table_sha256": file_sha256(out / "patches.parquet"),
        "decoded_bytes": int(stats_total["decoded_bytes"]),
        "timings": {**timings, "task_seconds_total": round(stats_total.get("task_seconds", 0.0), 3)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - t_start, 3),
        "cytonet_version": version,
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    return manifest


def extract_brain(
    brain: str,
    sections: pd.DataFrame,
    areas: pd.DataFrame,
    masks_dir: str | os.PathLike,
    out: str | os.PathLike,
    params: dict[str, Any] | None = None,
    *,
    threads: int = 1,
    scheduler: str | None = None,
    dask: dict[str, Any] | None = None,
    progress: bool = True,
    base_dir: str | os.PathLike = ".",
    opener: Callable | None = None,
) -> dict[str, Any]:
    """Sample and extract the patches of one brain into ``out`` (store, table, qc.csv, manifest.json last).

    ``sections`` is a sections table (``load_sections`` output: section_id, image, pixel_size_um, transform,
    annotation). ``opener`` replaces ``cytonet.io.readers.open_section`` (for tests; must be picklable when
    ``threads > 1``). Returns the manifest.
    """
    p = parse_params(params)
    out = Path(out)
    staging = _prepare_out(out)
    # The cluster starts (seconds; minutes for Slurm worker jobs) while the driver inspects and samples the
    # sections. One local worker and no scheduler: everything runs in this process.
    dask_cfg = parse_dask_config(dask)
    starter = BackgroundClient(dask_cfg, threads, scheduler) if wants_cluster(dask_cfg, threads, scheduler) else None
    workers = threads if scheduler else worker_count(dask_cfg, threads)
    try:
        t_start = time.time()
        bad, laps = _BadSections(p["on_bad_section"]), _Laps()
        inp = _BrainInputs(sections, areas, masks_dir, base_dir, opener)
        infos, cached = _inspect_sections(inp, bad)
        plan, kept = _sample_sections(inp, infos, cached, _section_counts(p, infos), p, bad, brain)
        laps("inspect_and_sample_s")
        log.info("brain %s: %d patch positions sampled in %d of %d section(s), %.1f s", brain, len(plan), len(kept),
                 len(sections), time.time() - t_start)
        plan, stats_total = _extract(plan, kept, p, staging, starter, workers, progress, inp, bad, brain, laps)
        table = _publish(out, staging, plan, brain, bad.qc)
        return _write_manifest(out, brain, table, p, bad.qc, stats_total, laps.timings, t_start)
    except BaseException:
        if starter is not None:
            starter.close()
        shutil.rmtree(staging, ignore_errors=True)  # an error leaves nothing behind (a kill is cleared by the rerun)
        raise


def _log_task_done(brain: str, done: int, n_tasks: int, written: int, n: int, t0: float) -> None:
    """One log line per finished extraction task, thinned to about every 10 % of the tasks (and the last)."""
    if done == n_tasks or done * 10 // n_tasks > (done - 1) * 10 // n_tasks:
        log.info("brain %s: extraction task %d/%d done, %d/%d patches written, %.1f s elapsed", brain, done,
                 n_tasks, written, n, time.perf_counter() - t0)


def _run_tasks(plan: pd.DataFrame, infos: list[SectionInfo], p: dict[str, Any], array_path: str, client: Any,
               workers: int, progress: bool, opener: Callable | None, stats_total: dict[str, int],
               brain: str = "") -> dict | None:
    """Split the plan into whole-shard tasks, run them, return the first failing section (or None)."""
    from cytonet.io.logs import progress as progress_bar  # a bar only on a terminal

    n, k = len(plan), p["shard_patches"]
    shards = [(s, min(s + k, n)) for s in range(0, n, k)]
    workers = max(1, workers)
    # Enough tasks to balance the workers, few enough that each reuses its cached tiles over many patches.
    per_task = max(1, min(math.ceil(len(shards) / (4 * workers)), max(1, 4096 // k)))
    sec_meta = [{"section": i.section, "image": i.image, "pixel_size_um": i.extra.get("pixel_size_override")}
                for i in infos]
    sec_col, tx, ty = plan["_sec"].to_numpy(), plan["tx0"].to_numpy(), plan["ty0"].to_numpy()
    tasks = []
    for j in range(0, len(shards), per_task):
        group = shards[j:j + per_task]
        a, b = group[0][0], group[-1][1]
        used = sorted(set(sec_col[a:b].tolist()))
        tasks.append({"array": array_path, "patch_px": p["patch_px"], "pixel_size_um": p["pixel_size_um"],
                      "shards": group, "section": sec_col[a:b], "tx0": tx[a:b], "ty0": ty[a:b],
                      "sections": {s: sec_meta[s] for s in used}, "opener": opener})
    bar = progress_bar(None, total=n, unit="patch", desc="patches", enabled=progress, mininterval=1.0)
    error = None
    t0, done, written = time.perf_counter(), 0, 0
    try:
        if client is None:
            results: Iterable = (_extract_task(t) for t in tasks)
        else:
            from dask.distributed import as_completed

            futures = client.map(_extract_task, tasks, pure=False)
            results = (f.result() for f in as_completed(futures))
        for res in results:
            if res["error"] is not None and error is None:
                error = res["error"]
                if client is not None:
                    client.cancel(futures)
                break
            stats_total["decoded_bytes"] += res["decoded_bytes"]
            stats_total["tile_reads"] += res["tile_reads"]
            stats_total["task_seconds"] = stats_total.get("task_seconds", 0.0) + res["seconds"]
            bar.update(res["patches"])
            done, written = done + 1, written + res["patches"]
            _log_task_done(brain, done, len(tasks), written, n, t0)
    finally:
        bar.close()
    return error



# ----------------------------------------------------------------------------------------------------------------
# validation


def validate_store(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` on any inconsistency of a patch store directory (or its manifest.json)."""
    import zarr

    path = Path(path)
    out = path.parent if path.name == "manifest.json" else path
    mpath = out / "manifest.json"
    if not mpath.is_file():
        raise ValueError(f"patch store {out}: manifest.json missing (store incomplete)")
    manifest = json.loads(mpath.read_text())
    tpath = out / "patches.parquet"
    if not tpath.is_file():
        raise ValueError(f"patch store {out}: patches.parquet missing")
    if file_sha256(tpath) != manifest.get("table_sha256"):
        raise ValueError(f"patch store {out}: patches.parquet checksum differs from manifest")
    table = pd.read_parquet(tpath)
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"patch store {out}: table lacks columns {missing}")
    try:
        group = zarr.open(out / "patches.zarr", mode="r")
        arr = group["patches"]
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"patch store {out}: cannot open patches.zarr/patches: {exc}") from exc
    n, S = manifest["n_patches"], manifest["patch_px"]
    if arr.shape != (n, S, S) or arr.dtype != np.uint8:
        raise ValueError(f"patch store {out}: array {arr.shape} {arr.dtype} != manifest ({n}, {S}, {S}) uint8")
    if len(table) != n:
        raise ValueError(f"patch store {out}: table has {len(table)} rows, store {n} patches")
    if not np.array_equal(table["index"].to_numpy(), np.arange(n)):
        raise ValueError(f"patch store {out}: table index is not 0..N-1")
    if set(table["brain"]) - {manifest["brain"]}:
        raise ValueError(f"patch store {out}: table names other brains than {manifest['brain']!r}")
    for key in ("pixel_size_um", "patch_px", "brain"):
        if group.attrs.get(key) != manifest[key]:
            raise ValueError(f"patch store {out}: attribute {key}={group.attrs.get(key)!r} "
                             f"!= manifest {manifest[key]!r}")
    counts = table["section"].value_counts().to_dict()
    if {s: int(c) for s, c in counts.items()} != manifest["sections"]:
        raise ValueError(f"patch store {out}: per-section counts differ from manifest")
    # Every shard must exist on disk (a missing shard would silently read as fill value 0).
    shard_dir = out / "patches.zarr" / "patches" / "c"
    k = arr.shards[0] if arr.shards else 1
    expected = math.ceil(n / k) if n else 0
    found = sum(1 for f in shard_dir.rglob("*") if f.is_file()) if shard_dir.exists() else 0
    if found != expected:
        raise ValueError(f"patch store {out}: {found} shard files on disk, expected {expected}")


# ----------------------------------------------------------------------------------------------------------------
# CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet patches``."""
    parser.add_argument("--brain", required=True, help="brain id (row of the brains table)")
    parser.add_argument("--brains-table", required=True, help="brains table (CSV/TSV)")
    parser.add_argument("--areas", required=True, help="areas table (CSV/TSV)")
    parser.add_argument("--masks-dir", required=True, help="folder with <section>.png tissue masks")
    parser.add_argument("--out", required=True, help="output folder of the patch store")
    parser.add_argument("--threads", type=int, default=1, help="Dask worker processes (1 = in-process)")
    parser.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler to use instead")
    parser.add_argument("--dask", default=None, metavar="JSON",
                        help="where the Dask workers run: the config's dask section as a JSON object, or a YAML/JSON "
                             "file of it (keys in cytonet.preprocess.dask_cluster.DEFAULTS; default: a local "
                             "cluster of --threads workers)")
    parser.add_argument("--params", default=None, help="JSON object, or path to a JSON file, of parameters")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="set one parameter")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cli_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.params:
        text = args.params
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        params.update(json.loads(text))
    for item in args.param:
        if "=" not in item:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = value.strip()
    return params


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet patches``."""
    from cytonet.io.tables import load_areas, load_brains, load_sections

    params = parse_params(_cli_params(args))
    brains = load_brains(args.brains_table)
    rows = brains[brains["brain_id"] == args.brain]
    if rows.empty:
        raise ValueError(f"brain {args.brain!r} not in brains table {args.brains_table}")
    sections_path = rows.iloc[0]["sections"]
    sections = load_sections(sections_path, args.brain, check_files=False)
    areas = load_areas(args.areas)
    dask = parse_dask_config(read_params(args.dask))
    manifest = extract_brain(args.brain, sections, areas, args.masks_dir, args.out, params, threads=args.threads,
                             scheduler=args.scheduler, dask=dask, progress=not args.no_progress,
                             base_dir=Path(sections_path).parent)
    log.info("brain %s: %d patches from %d sections in %.1f s -> %s", args.brain, manifest["n_patches"],
             len(manifest["sections"]), manifest["seconds"], args.out)
    return 0
