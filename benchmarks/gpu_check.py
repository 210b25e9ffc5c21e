"""GPU check: how much work one GPU does in CytoNet's two GPU stages, and what that makes a brain cost.

    benchmarks/gpu_check.sh                               # on a GPU node: checks nvidia-smi, < 8 min on one GPU
    .venv/bin/python benchmarks/gpu_check.py              # the same without the shell checks
    .venv/bin/python benchmarks/gpu_check.py --smoke      # CPU, tiny sizes, < 60 s: shows that the script runs

What it measures, on one device, with the cluster settings of config/jureca.yaml (``--smoke``: the same code on
the CPU in fp32 with tiny stand-ins: the small encoder, 64 px windows and patches, a 1024 px section; its figures
say only that the script works):

1. **Dense trunk.** The ResNet-50 trunk of dense inference (``bench_infer.build_model``: torchvision ResNet-50,
   one input channel, split at its global pool as ``cytonet.mapping.infer`` does) on one tile of the cluster
   geometry of ``bench_infer.extrapolate_bigbrain`` (tile core + 2048 px window + receptive-field halo), bf16
   autocast and a channels-last input as ``cytonet.mapping.infer`` runs it on CUDA: MPix/s, TFLOP/s (FLOPs per
   pixel counted by torch's FlopCounterMode, ``bench_infer.trunk_flops_per_px``) and the share of the GPU's bf16
   peak.
2. **Dense inference end to end.** ``cytonet.mapping.infer.infer_section(mode="dense")`` on a synthetic phantom
   section (``bench_infer.make_section``) with config/jureca.yaml's ``infer.tile_px`` and ``infer.output_um``:
   MPix/s of section pixels at the network resolution, with reading, decoding and writing the maps included.
3. **Pretraining.** ``cytonet.learn.pretrain.pretrain`` (the SpatialNCE training step as the cluster runs it:
   config/jureca.yaml's ``pretrain`` section, ResNet-50 at its 2048 px patches, bf16 autocast, ``augment_on``)
   for a few steps on a synthetic Zarr patch store; samples/s from the step times of its metrics.csv (one sample
   = anchor + partner = 2 patches). The batch starts at the config's ``batch_size`` per rank and is halved until
   it fits the GPU's memory. FLOPs per sample (forward + backward) are counted on the meta device.
4. **Loader.** The training DataLoader (``cytonet.nn.data``: SpatialPairDataset, AnchorSampler, collate_pairs,
   the config's ``num_workers``, capped by the CPUs here) alone, reading the same store one Zarr chunk per patch
   (as stores over ``$CYTONET_PATCH_CACHE_MB`` do), with the config's ``augment_on`` and with the other setting:
   patch reads/s against the GPU's demand (2 reads per sample at the measured step rate).
5. **GPU-hours** per 7,400-section brain, recomputed from 1-3 with ``bench_infer.extrapolate_bigbrain``'s section
   size, grid and halo, beside the assumption of docs/cluster.md (an A100 at ``bench_infer.A100_ACHIEVED`` of its
   bf16 peak); pretraining for config/jureca.yaml's ``pretrain.samples``.

Peak: ``PEAK_BF16_TFLOPS`` by ``torch.cuda.get_device_name``, or ``$CYTONET_GPU_PEAK_TFLOPS`` (dense bf16 TFLOP/s);
without either the shares are left out. Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md``
(``gpu_check_smoke.*`` with ``--smoke``), default out benchmarks/out/gpu_check/.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import bench_infer  # noqa: E402
import torch  # noqa: E402

from cytonet.nn.models import autocast, build_encoder  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a part of the device name; the first match wins, so the
# more specific names come first. Anything else: set $CYTONET_GPU_PEAK_TFLOPS.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("A100", 312.0),
)
PEAK_ENV = "CYTONET_GPU_PEAK_TFLOPS"
# Rank variables cytonet.nn.distributed.detect_env reads: the check is one process on one device.
SINGLE_PROCESS_UNSET = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
JURECA_CONFIG = ROOT / "config" / "jureca.yaml"


def peak_bf16_flops(device_name: str | None) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s, where it came from): $CYTONET_GPU_PEAK_TFLOPS, else the table, else (None, ...)."""
    env = os.environ.get(PEAK_ENV)
    if env:
        try:
            value = float(env)
        except ValueError as err:
            raise ValueError(f"${PEAK_ENV}={env!r}: expected a number of TFLOP/s") from err
        if value <= 0:
            raise ValueError(f"${PEAK_ENV}={env!r}: must be > 0")
        return value * 1e12, f"${PEAK_ENV}"
    for part, tflops in PEAK_BF16_TFLOPS:
        if device_name and part.lower() in device_name.lower():
            return tflops * 1e12, f"table ({part})"
    return None, f"unknown device {device_name!r}: set ${PEAK_ENV}"


def jureca_config() -> dict[str, Any]:
    """config/jureca.yaml validated against the schema (defaults filled in): the cluster's settings."""
    import yaml

    from cytonet.io.config import validate_config

    return validate_config(yaml.safe_load(JURECA_CONFIG.read_text()))


def bigbrain_assumptions(flop_per_px: float = 1.0, rf_margin_px: int = 0, trunk_flops: float = 1.0) -> dict:
    """bench_infer's BigBrain-scale extrapolation (the figures of docs/cluster.md) for these trunk measurements."""
    return bench_infer.extrapolate_bigbrain([{"arch": "resnet50", "flop_per_px": flop_per_px,
                                              "rf_margin_px": rf_margin_px,
                                              "dense_trunk_gflop_s": trunk_flops / 1e9}])


@dataclass(frozen=True)
class Sizes:
    """What is run: the cluster's sizes (full) or tiny stand-ins (smoke)."""

    encoder: str          # of inference and pretraining (smoke: the small CPU encoder)
    window_px: int        # network input S of inference
    net_um: float         # network resolution (µm/px)
    output_um: float      # area-map resolution
    tile_px: int          # infer_section tile core (network px)
    trunk_tile_px: int    # tile core of the trunk measurement (window and halo added)
    trunk_reps: int
    section_px: int       # synthetic section side at 2 µm/px
    patch_px: int         # pretraining patch side
    batch: int            # pairs per step tried first (halved until it fits)
    steps: int            # pretraining steps (the first 2 are not timed)
    workers: int          # DataLoader workers
    loader_batches: int
    store_grid: int       # synthetic store: 2 sections x grid² patches


def sizes_for(smoke: bool, cfg: dict[str, Any]) -> Sizes:
    """Full: config/jureca.yaml and bench_infer's cluster geometry; smoke: small enough for 2 CPU cores."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(int(cfg["pretrain"]["num_workers"]), cpus))
    if smoke:
        return Sizes(encoder="small", window_px=64, net_um=8.0, output_um=256.0, tile_px=256, trunk_tile_px=128,
                     trunk_reps=2, section_px=1024, patch_px=64, batch=2, steps=4, workers=min(workers, 2),
                     loader_batches=4, store_grid=3)
    geo = bigbrain_assumptions()["assumptions"]
    return Sizes(encoder=str(cfg["pretrain"]["encoder"]), window_px=int(geo["window_px"]),
                 net_um=float(geo["network_um"]), output_um=float(cfg["infer"]["output_um"]),
                 tile_px=int(cfg["infer"]["tile_px"]), trunk_tile_px=int(geo["tile_px"]), trunk_reps=5,
                 section_px=12288,
                 patch_px=int(cfg["patches"]["patch_px"]), batch=int(cfg["pretrain"]["batch_size"]), steps=8,
                 workers=workers, loader_batches=3 * workers, store_grid=3)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_mem_gb(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _sig(x: float) -> float:
    """Four significant digits (rates span 1e-3 on a CPU to 1e3 on a GPU)."""
    return float(f"{x:.4g}")


def _share(flops_per_s: float, peak: float | None) -> float | None:
    return _sig(flops_per_s / peak) if peak else None


# ----------------------------------------------------------------------------------------------- measurements
def _is_oom(err: BaseException) -> bool:
    """CUDA out of memory, also where cuDNN/cuBLAS report it as a failed allocation."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in ("out of memory", "ALLOC_FAILED")))


def _time_trunk(trunk: torch.nn.Module, side: int, dev: torch.device, reps: int) -> float:
    """Seconds per pass of the trunk over one side² tile, after a warm-up pass (kernel selection, allocations)."""
    x = torch.randn(1, 1, side, side, device=dev)
    if dev.type == "cuda":  # as cytonet.mapping.infer feeds tiles on CUDA
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(dev):
        trunk(x)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            trunk(x)
        _sync(dev)
    return (time.perf_counter() - t0) / reps


def measure_trunk(dm: Any, sizes: Sizes, dev: torch.device, peak: float | None) -> dict[str, Any]:
    """The dense trunk on one tile (core + window + halo rounded to feature cells), as infer runs it; a tile core
    too big for the device's memory is halved."""
    flop_px = bench_infer.trunk_flops_per_px(dm)  # on the CPU, before the trunk moves
    trunk = dm.trunk.to(dev).eval()
    margin = dm.rf_margin_px()  # measured on the device, cached for infer_section
    halo = 2 * math.ceil(margin / dm.net_stride) * dm.net_stride
    core, oom = sizes.trunk_tile_px, []
    while True:
        side = core + sizes.window_px + halo
        try:
            sec = _time_trunk(trunk, side, dev, sizes.trunk_reps)
            break
        except RuntimeError as err:
            if not _is_oom(err) or core <= sizes.window_px:
                raise
        oom.append(core)
        _free(dev)  # outside the except block: the traceback no longer holds the activations
        core //= 2
    px_s = side * side / sec
    res = {"tile_core_px": core, "tile_side_px": side, "tile_cores_out_of_memory": oom, "rf_margin_px": margin,
           "flop_per_px": flop_px, "seconds_per_tile": _sig(sec), "mpix_s": _sig(px_s / 1e6),
           "tflop_s": _sig(px_s * flop_px / 1e12), "share_of_peak": _share(px_s * flop_px, peak),
           "peak_mem_gb": _peak_mem_gb(dev)}
    _free(dev)
    return res


def measure_infer(dm: Any, sizes: Sizes, dev: torch.device, work: Path, flop_px: float,
                  peak: float | None) -> dict[str, Any]:
    """infer_section in dense mode on a synthetic section, end to end (reads, trunk, pooling, head, writes)."""
    from cytonet.io.readers import open_section
    from cytonet.mapping.infer import infer_section

    t0 = time.perf_counter()
    image, mask = bench_infer.make_section(work / f"section_{sizes.section_px}.ome.tif", sizes.section_px)
    make_s = time.perf_counter() - t0
    sec = open_section(image)
    f = sec.pixel_size_um / sizes.net_um
    net_px = round(sec.levels[0].shape[0] * f) * round(sec.levels[0].shape[1] * f)
    _sync(dev)
    t0 = time.perf_counter()
    r = infer_section(image, mask, dm, None, work / "maps", name="sec", output_um=sizes.output_um,
                      tile_px=sizes.tile_px, mode="dense", device=str(dev), progress=False, overlay=False)
    _sync(dev)
    seconds = time.perf_counter() - t0
    info = json.loads(r.paths["manifest"].read_text())
    flops = info["trunk_px"] * flop_px
    res = {"section_px": sizes.section_px, "network_px": net_px, "window_px": sizes.window_px,
           "tile_px": sizes.tile_px, "output_um": sizes.output_um, "n_tiles": info["n_tiles"],
           "trunk_px": info["trunk_px"], "seconds": round(seconds, 3), "make_section_s": round(make_s, 1),
           "mpix_s": _sig(net_px / seconds / 1e6), "trunk_tflop_s": _sig(flops / seconds / 1e12),
           "share_of_peak": _share(flops / seconds, peak), "peak_mem_gb": _peak_mem_gb(dev)}
    _free(dev)
    return res


def train_flops_per_sample(cfg: dict[str, Any], encoder: str, px: int) -> float:
    """Forward + backward FLOPs of one sample (2 views) of the pretraining encoder, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    pre = cfg["pretrain"]
    side = pre["input_px"] or px
    model = build_encoder(encoder, pre["embedding_dim"], pre["proj_hidden"]).to("meta").train()
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(2, 1, side, side, device="meta")).float().sum().backward()
    return float(fc.get_total_flops())


def make_patch_store(sizes: Sizes, work: Path) -> Path:
    """A synthetic Zarr v3 patch store in the patch stage's layout (tests/learning_fixtures.make_store)."""
    from learning_fixtures import make_store

    return make_store(work / "store", "b1", n_sections=2, grid=sizes.store_grid, patch_px=sizes.patch_px, seed=0)


def _pretrain_config(cfg: dict[str, Any], sizes: Sizes, batch: int) -> dict[str, Any]:
    """config/jureca.yaml's pretrain section for a few logged steps of ``batch`` pairs on this one device."""
    return {**cfg["pretrain"], "encoder": sizes.encoder, "steps": sizes.steps, "batch_size": batch,
            "num_workers": sizes.workers, "log_every": 1, "checkpoint_every": 10**9, "radius_mm": 0.6,
            "tensorboard": False}


def measure_pretrain(store: Path, cfg: dict[str, Any], sizes: Sizes, dev: torch.device, work: Path,
                     peak: float | None) -> dict[str, Any]:
    """A few steps of ``pretrain()``; the batch is halved from the config's until it fits the device."""
    import pandas as pd

    from cytonet.learn.pretrain import pretrain

    batch, tried = sizes.batch, []
    while True:
        out = work / f"pretrain_b{batch}"
        _free(dev)
        try:
            pretrain([store], out, _pretrain_config(cfg, sizes, batch), device=dev.type, progress=False)
            break
        except RuntimeError as err:
            if not _is_oom(err) or batch == 1:
                raise
        tried.append(batch)
        batch //= 2
    log = pd.read_csv(out / "metrics.csv").iloc[2:]  # step 1 starts the workers, step 2 still warms up
    step_s = float(log["step_s"].median())
    flops = train_flops_per_sample(cfg, sizes.encoder, sizes.patch_px)
    rate = batch / step_s
    summary = json.loads((out / "summary.json").read_text())
    res = {"encoder": sizes.encoder, "patch_px": sizes.patch_px,
           "precision": "bf16" if dev.type == "cuda" else "fp32", "augment_on": cfg["pretrain"]["augment_on"],
           "batch_pairs": batch, "batch_config": sizes.batch, "batches_out_of_memory": tried,
           "timed_steps": len(log), "step_s_median": _sig(step_s), "samples_per_s": _sig(rate),
           "end_to_end_samples_per_s": _sig(batch * len(log) / float(log[["step_s", "loader_wait_s"]].sum().sum())),
           "loader_wait_frac": summary.get("loader_wait_frac"), "flop_per_sample": flops,
           "tflop_s": _sig(rate * flops / 1e12), "share_of_peak": _share(rate * flops, peak),
           "peak_mem_gb": _peak_mem_gb(dev), "workers": sizes.workers}
    _free(dev)
    return res


def loader_rate(store: Path, cfg: dict[str, Any], sizes: Sizes, batch: int, raw: bool, dev: torch.device) -> float:
    """Pairs/s of the training DataLoader alone (workers, pinned memory, prefetch as cytonet.learn.pretrain)."""
    from torch.utils.data import DataLoader

    from cytonet.nn.data import AnchorSampler, PatchStores, SpatialPairDataset, collate_pairs

    pre = cfg["pretrain"]
    ds = SpatialPairDataset(PatchStores([store], cache_mb=0), 0.6, seed=pre["seed"], within_brain=pre["within_brain"],
                            out_px=pre["input_px"], raw=raw)
    loader = DataLoader(ds, batch_size=batch, sampler=AnchorSampler(len(ds), batch * (sizes.loader_batches + 1)),
                        collate_fn=collate_pairs, num_workers=sizes.workers, drop_last=True,
                        pin_memory=dev.type == "cuda", prefetch_factor=4)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0 = time.perf_counter()
    n = sum(b["view1"].shape[0] for b, _ in zip(it, range(sizes.loader_batches)))
    return n / (time.perf_counter() - t0)


def measure_loader(store: Path, cfg: dict[str, Any], sizes: Sizes, train: dict[str, Any],
                   dev: torch.device) -> dict[str, Any]:
    """Patch reads/s of the loader with the config's augment_on and with the other one, against GPU demand."""
    demand = 2 * train["samples_per_s"]  # patch reads per second the measured step consumes
    res: dict[str, Any] = {"workers": sizes.workers, "reads": "one Zarr chunk per patch (cache_mb=0)",
                           "gpu_demand_reads_per_s": _sig(demand)}
    for augment_on in ("device", "loader"):
        pairs = loader_rate(store, cfg, sizes, train["batch_pairs"], augment_on == "device", dev)
        reads = 2 * pairs
        res[f"augment_on_{augment_on}"] = {
            "reads_per_s": _sig(reads), "reads_per_s_per_worker": _sig(reads / sizes.workers),
            "over_demand": _sig(reads / demand),
            "workers_to_meet_demand": math.ceil(demand / (reads / sizes.workers))}
    res["configured"] = cfg["pretrain"]["augment_on"]
    return res


# ---------------------------------------------------------------------------------------------- GPU-hours, report
def gpu_hours(trunk: dict, infer: dict, train: dict, loader: dict, cfg: dict[str, Any]) -> dict[str, Any]:
    """GPU-hours per brain from the measured rates, with bench_infer's cluster geometry; and docs' assumption."""
    bb = bigbrain_assumptions(trunk["flop_per_px"], trunk["rf_margin_px"], trunk["mpix_s"] * 1e6 * trunk["flop_per_px"])
    a = bb["assumptions"]
    sections = a["sections"]
    px = (a["section_um"][0] / a["network_um"]) * (a["section_um"][1] / a["network_um"])  # per section
    samples = int(cfg["pretrain"]["samples"])
    loader_pairs = loader[f"augment_on_{loader['configured']}"]["reads_per_s"] / 2
    a100 = bench_infer.A100_BF16_PEAK * bench_infer.A100_ACHIEVED
    return {
        "sections": sections, "section_um": a["section_um"], "network_um": a["network_um"],
        "window_px": a["window_px"], "tile_px": a["tile_px"], "halo_factor": a["halo_factor"],
        "pretraining_samples": samples,
        # Whole sections as tissue and bench_infer's halo factor: the trunk rate alone.
        "inference_dense_trunk": _sig(sections * px * a["halo_factor"] / (trunk["mpix_s"] * 1e6) / 3600),
        # infer_section's own rate on the synthetic section (its tissue fraction, tiles and I/O).
        "inference_end_to_end": _sig(sections * px / (infer["mpix_s"] * 1e6) / 3600),
        "pretraining_compute": _sig(samples / train["samples_per_s"] / 3600),
        "pretraining_loader_bound": _sig(samples / min(train["samples_per_s"], loader_pairs) / 3600),
        "assumed_a100": {"achieved_fraction": bench_infer.A100_ACHIEVED, "inference_dense": bb["dense_gpu_hours"],
                         "pretraining": _sig(samples * train["flop_per_sample"] / a100 / 3600)},
    }


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        v = f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v}{unit}"


def _share_pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _rates_table(r: dict[str, Any]) -> list[str]:
    t, i, p, ld = r["trunk"], r["infer"], r["pretrain"], r["loader"]
    lines = ["| what | setting | rate | TFLOP/s | share of peak | peak GPU memory |", "|---|---|---|---|---|---|",
             f"| dense trunk ({r['sizes']['encoder']}) | window {r['sizes']['window_px']} px, "
             f"tile {t['tile_side_px']}² px | "
             f"{_fmt(t['mpix_s'])} MPix/s | {_fmt(t['tflop_s'])} | {_share_pct(t['share_of_peak'])} | "
             f"{_fmt(t['peak_mem_gb'], ' GB')} |",
             f"| dense `infer_section`, end to end | section {i['section_px']}² px, tile_px {i['tile_px']}, "
             f"{i['n_tiles']} tiles, {_fmt(i['output_um'])} µm maps | {_fmt(i['mpix_s'])} MPix/s | "
             f"{_fmt(i['trunk_tflop_s'])} | {_share_pct(i['share_of_peak'])} | {_fmt(i['peak_mem_gb'], ' GB')} |",
             f"| pretraining step (SpatialNCE, {p['encoder']}) | {p['patch_px']} px, batch {p['batch_pairs']} pairs "
             f"(config {p['batch_config']}), augment_on {p['augment_on']} | {_fmt(p['samples_per_s'])} samples/s | "
             f"{_fmt(p['tflop_s'])} | {_share_pct(p['share_of_peak'])} | {_fmt(p['peak_mem_gb'], ' GB')} |"]
    for mode in ("device", "loader"):
        m = ld[f"augment_on_{mode}"]
        lines.append(f"| loader, augment_on {mode}{' (configured)' if ld['configured'] == mode else ''} | "
                     f"{ld['workers']} workers, chunk reads | {_fmt(m['reads_per_s'])} reads/s = "
                     f"{_fmt(m['over_demand'])}× the GPU's {_fmt(ld['gpu_demand_reads_per_s'])} | "
                     f"workers needed: {m['workers_to_meet_demand']} | | |")
    return lines


def _hours_table(r: dict[str, Any]) -> list[str]:
    h, ld = r["gpu_hours"], r["loader"]
    a100 = h["assumed_a100"]
    return [f"GPU-hours per brain ({h['sections']:,} sections of {h['section_um'][0] / 1000:g} × "
            f"{h['section_um'][1] / 1000:g} mm at {h['network_um']:g} µm/px; pretraining "
            f"{h['pretraining_samples']:,} samples):", "",
            f"| stage | measured on this device | assumed: A100 at {100 * a100['achieved_fraction']:g} % of bf16 "
            "peak (docs/cluster.md) |", "|---|---|---|",
            f"| dense inference, trunk (halo factor {h['halo_factor']}, tissue fraction 1) | "
            f"{_fmt(h['inference_dense_trunk'])} | {_fmt(a100['inference_dense'])} |",
            f"| dense inference, `infer_section` end to end | {_fmt(h['inference_end_to_end'])} | – |",
            f"| pretraining, compute | {_fmt(h['pretraining_compute'])} | {_fmt(a100['pretraining'])} |",
            f"| pretraining, bounded by the configured loader on {ld['workers']} workers | "
            f"{_fmt(h['pretraining_loader_bound'])} | – |"]


def report(r: dict[str, Any]) -> str:
    """The Markdown tables of one run."""
    head = f"# GPU check: {r['device_name']}"
    if r["smoke"]:
        head += " (SMOKE: CPU, tiny sizes, fp32; not a GPU figure)"
    info = (f"{r['date']}; torch {r['torch']}, CUDA {r['cuda']}; {r['cpus']} CPUs; bf16 peak "
            f"{_fmt(r['peak_tflops'], ' TFLOP/s')} ({r['peak_source']}); precision {r['pretrain']['precision']}; "
            f"total {r['seconds']:.0f} s.")
    return "\n".join([head, "", info, "", *_rates_table(r), "", *_hours_table(r)]) + "\n"


def run_check(sizes: Sizes, cfg: dict[str, Any], dev: torch.device, work: Path, peak: float | None) -> dict:
    """The four measurements in order; returns them with their wall times."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"gpu_check: {name} done in {timings[name]} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()

    dm = bench_infer.build_model(sizes.encoder, sizes.window_px, sizes.net_um)
    trunk = measure_trunk(dm, sizes, dev, peak)
    lap("trunk")
    infer = measure_infer(dm, sizes, dev, work, trunk["flop_per_px"], peak)
    lap("infer_section")
    del dm
    store = make_patch_store(sizes, work)
    lap("patch store")
    train = measure_pretrain(store, cfg, sizes, dev, work, peak)
    lap("pretrain")
    loader = measure_loader(store, cfg, sizes, train, dev)
    lap("loader")
    return {"trunk": trunk, "infer": infer, "pretrain": train, "loader": loader, "timings_s": timings}


def main(argv: list[str] | None = None) -> int:
    """Run the check, write <out>/gpu_check[_smoke].json and .md, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", "--quick", dest="smoke", action="store_true",
                    help="CPU, tiny sizes, < 60 s (not a GPU measurement); --quick as in the other benchmarks")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu_check"))
    ap.add_argument("--device", help="torch device (default: cuda; with --smoke: cpu)")
    ap.add_argument("--section-px", type=int, help="side of the synthetic section at 2 µm/px (default 12288)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False): run it on a GPU node "
              "(benchmarks/gpu_check.sh), or with --smoke for the CPU check", file=sys.stderr)
        return 2
    cfg = jureca_config()
    sizes = sizes_for(args.smoke, cfg)
    if args.section_px:
        sizes = replace(sizes, section_px=args.section_px)
    meta = bench_infer.machine()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU: {meta['cpu']}"
    peak, peak_source = peak_bf16_flops(name if dev.type == "cuda" else None)
    os.environ["CYTONET_PATCH_CACHE_MB"] = "0"  # pretrain's store reads one chunk per patch, as big stores do
    for var in SINGLE_PROCESS_UNSET:  # inside an sbatch/srun/torchrun job pretrain() would wait for other ranks
        os.environ.pop(var, None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="work-", dir=out) as tmp:
        res = run_check(sizes, cfg, dev, Path(tmp), peak)
    result = {"smoke": args.smoke, "device": str(dev), "device_name": name, "date": meta["date"],
              "torch": meta["torch"], "cuda": torch.version.cuda, "cpus": meta["nproc"],
              "load_avg": meta["load_avg"], "peak_tflops": peak / 1e12 if peak else None,
              "peak_source": peak_source, "sizes": asdict(sizes), **res}
    result["gpu_hours"] = gpu_hours(res["trunk"], res["infer"], res["pretrain"], res["loader"], cfg)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    stem = "gpu_check_smoke" if args.smoke else "gpu_check"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = report(result)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
