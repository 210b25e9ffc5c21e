"""Preprocessing benchmark at gigapixel scale: masking, patch extraction, naive baseline, decode limit, store reads.

    .venv/bin/python benchmarks/bench_preprocess.py            # 40,000² px section, 5,000 patches of 512 px
    .venv/bin/python benchmarks/bench_preprocess.py --quick    # 8,192² px section, 1,000 patches (< 1 min)

The section is generated with ``cytonet.synth.write_big_section`` into ``benchmarks/out/`` when missing. Every
stage runs in its own subprocess; the parent samples the RSS of that process tree (dask workers included) with
psutil, so the peak RSS covers everything the stage started. Results: a table on stdout and
``benchmarks/out/bench_preprocess[_quick].json``.

Stages
  mask      cytonet.preprocess.mask.mask_image at its default resolution
  extract   cytonet patches (sampling + extraction into the sharded Zarr v3 store), LocalCluster of --threads
  naive     the same patch positions, each read on its own with a fresh TIFF open and written as its own chunk
            of a plain Zarr v3 array (benchmarks/naive_extract.py), in a process pool of --threads
  decode    the limit: decode every tile of the full-resolution level once (tifffile page.decode, no zarr
            overhead), dask over blocks of 256 tiles, --threads worker processes
  store     reading the patch store back one patch at a time: shuffled indices (as a training loader) vs in order
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# ----------------------------------------------------------------------------------------------------------------
# stages (run in a child process)


def stage_mask(a: argparse.Namespace) -> dict:
    from cytonet.preprocess.mask import mask_image

    work = Path(a.work)
    t0 = time.perf_counter()
    res = mask_image(a.section, work / "masks" / "big.png", section_id="big")
    wall = time.perf_counter() - t0
    from cytonet.io.readers import open_section

    sec = open_section(a.section)
    h, w = sec.levels[res.source_level].shape
    return {"wall_s": wall, "decoded_bytes": h * w, "resolution_um": res.resolution_um,
            "source_level": res.source_level, "mask_shape": list(res.shape), "tissue_fraction": res.tissue_fraction}


def stage_extract(a: argparse.Namespace) -> dict:
    import pandas as pd

    from cytonet.cli import main

    work = Path(a.work)
    tables = work / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"section_id": "big", "image": str(Path(a.section).resolve()), "z_um": 0.0,
                   "transform": "0.002 0 0 0 0 0.002 0 0 0 0 0 0"}]).to_csv(tables / "sections.csv", index=False)
    pd.DataFrame([{"brain_id": "bench", "sections": "sections.csv", "role": "known"}]).to_csv(
        tables / "brains.csv", index=False)
    pd.DataFrame([{"area_id": 1, "name": "A", "color": "#ff0000"}]).to_csv(tables / "areas.csv", index=False)
    params = {"patch_px": a.patch_px, "pixel_size_um": a.target_um, "count": a.count, "count_per": "section",
              "min_tissue_fraction": 0.5, "shard_patches": a.shard_patches, "seed": 0}
    t0 = time.perf_counter()
    rc = main(["patches", "--brain", "bench", "--brains-table", str(tables / "brains.csv"), "--areas",
               str(tables / "areas.csv"), "--masks-dir", str(work / "masks"), "--out", str(work / "store"),
               "--threads", str(a.threads), "--params", json.dumps(params)])
    wall = time.perf_counter() - t0
    manifest = json.loads((work / "store" / "manifest.json").read_text())
    return {"rc": rc, "wall_s": wall, "n_patches": manifest["n_patches"], "decoded_bytes": manifest["decoded_bytes"],
            "patch_bytes": manifest["n_patches"] * a.patch_px**2}


def _positions(a: argparse.Namespace) -> tuple[int, int, np.ndarray]:
    """Level, factor and (y0, x0) level-pixel origins of the patches of the store (same as extraction)."""
    import pandas as pd

    from cytonet.io.readers import open_section
    from cytonet.preprocess.patches import level_and_factor

    sec = open_section(a.section)
    level, f = level_and_factor(sec, a.target_um)
    t = pd.read_parquet(Path(a.work) / "store" / "patches.parquet")
    scale = a.target_um / sec.pixel_size_um
    foot = a.patch_px * scale
    tx0 = np.rint((t.x_px.to_numpy() + 0.5 - foot / 2) / scale).astype(np.int64)
    ty0 = np.rint((t.y_px.to_numpy() + 0.5 - foot / 2) / scale).astype(np.int64)
    fi = int(round(f))
    return level, fi, np.stack([ty0 * fi, tx0 * fi], axis=1)


def stage_naive(a: argparse.Namespace) -> dict:
    from multiprocessing import get_context

    import zarr
    from naive_extract import create_store, extract_chunk, read_patch

    level, fi, pos = _positions(a)
    size = a.patch_px * fi
    # Correctness cross-check: the naive reads equal the stored patches (f == 1).
    if fi == 1:
        arr = zarr.open(Path(a.work) / "store" / "patches.zarr", mode="r")["patches"]
        for i in np.linspace(0, len(pos) - 1, 5).astype(int):
            if not np.array_equal(arr[i], read_patch(a.section, level, *pos[i], size)):
                raise SystemExit(f"naive patch {i} differs from the stored patch")
    store = str(Path(a.work) / "naive.zarr")
    create_store(store, len(pos), size)
    bounds = np.linspace(0, len(pos), a.threads * 8 + 1).astype(int)
    chunks = [(a.section, level, size, pos[i:j], store, int(i)) for i, j in zip(bounds[:-1], bounds[1:]) if j > i]
    t0 = time.perf_counter()
    with get_context("spawn").Pool(a.threads) as pool:
        total = sum(pool.map(extract_chunk, chunks))
    wall = time.perf_counter() - t0
    tile = 256
    tiles = sum(((y + size - 1) // tile - y // tile + 1) * ((x + size - 1) // tile - x // tile + 1) for y, x in pos)
    return {"wall_s": wall, "n_patches": len(pos), "patch_bytes": total, "decoded_bytes": tiles * tile * tile}


def _decode_tiles(args: tuple[str, int, int]) -> int:
    """Decode tiles [i0, i1) of the full-resolution level directly (the fastest way to get every pixel once)."""
    import tifffile

    path, i0, i1 = args
    total = 0
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].pages[0]
        fh = tf.filehandle
        for idx in range(i0, i1):
            fh.seek(page.dataoffsets[idx])
            total += page.decode(fh.read(page.databytecounts[idx]), idx)[0].size
    return total


def stage_decode(a: argparse.Namespace) -> dict:
    import tifffile
    from dask.distributed import Client, LocalCluster

    with tifffile.TiffFile(a.section) as tf:
        page = tf.series[0].levels[0].pages[0]
        n_tiles = len(page.dataoffsets)
        tile_bytes = page.tilelength * page.tilewidth
    step = 256  # tiles per dask task
    tasks = [(a.section, i, min(i + step, n_tiles)) for i in range(0, n_tiles, step)]
    with LocalCluster(n_workers=a.threads, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit=0) as cluster, Client(cluster) as client:
        client.submit(lambda: 0).result()  # cluster up before timing (extraction's timing includes its start-up)
        t0 = time.perf_counter()
        total = sum(client.gather(client.map(_decode_tiles, tasks, pure=False)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "decoded_bytes": total, "n_tiles": n_tiles, "tile_bytes": tile_bytes}


def stage_store(a: argparse.Namespace) -> dict:
    import zarr

    arr = zarr.open(Path(a.work) / "store" / "patches.zarr", mode="r")["patches"]
    n = min(arr.shape[0], a.store_reads)
    rng = np.random.default_rng(0)
    out = {}
    for name, idx in (("random", rng.permutation(arr.shape[0])[:n]), ("sequential", np.arange(n))):
        arr = zarr.open(Path(a.work) / "store" / "patches.zarr", mode="r")["patches"]  # fresh, no warm state
        t0 = time.perf_counter()
        for i in idx:
            arr[int(i)]
        wall = time.perf_counter() - t0
        out[name] = {"wall_s": wall, "patches_per_s": n / wall,
                     "MB_per_s": n * arr.shape[1] * arr.shape[2] / wall / 1e6}
    return out


STAGES = {"mask": stage_mask, "extract": stage_extract, "naive": stage_naive, "decode": stage_decode,
          "store": stage_store}


# ----------------------------------------------------------------------------------------------------------------
# parent: runs each stage in a subprocess and samples its tree's RSS


def run_stage(name: str, a: argparse.Namespace) -> dict:
    import psutil

    result = Path(a.work) / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--section", a.section, "--work", a.work,
           "--threads", str(a.threads), "--count", str(a.count), "--patch-px", str(a.patch_px),
           "--target-um", str(a.target_um), "--shard-patches", str(a.shard_patches),
           "--store-reads", str(a.store_reads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if not a.verbose else None, stderr=subprocess.PIPE,
                            text=True)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                break
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed (rc {proc.returncode}):\n{err[-4000:]}")
    res = json.loads(result.read_text())
    res["process_wall_s"] = total
    res["peak_rss_bytes"] = peak[0]
    return res


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {"nproc": os.cpu_count(), "cpu_model": model, "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write_texture_section(path: Path, size: int, pixel_size_um: float, seed: int = 0) -> Path:
    """Fallback generator (much faster than the phantom): a tissue blob with dark cells on a light background,
    written strip by strip as a tiled pyramidal OME-TIFF (same writer as cytonet.synth)."""
    from scipy.ndimage import uniform_filter

    from cytonet.synth.tiff import write_pyramid_tiled

    rng = np.random.default_rng(seed)
    strip_h = 1024

    def strips():
        xs = np.arange(size, dtype=np.float32)[None, :] / size - 0.5
        for y in range(0, size, strip_h):
            h = min(strip_h, size - y)
            ys = (np.arange(y, y + h, dtype=np.float32)[:, None] / size - 0.5)
            r = np.sqrt((xs / 0.42) ** 2 + (ys / 0.36) ** 2)
            wav = 0.06 * np.sin(np.arctan2(ys, xs) * 7)
            tissue = r < 1 + wav
            field = uniform_filter(rng.random((h, size), dtype=np.float32), 5)
            cells = field > 0.62
            img = np.where(tissue, 200 - 110 * cells, 228).astype(np.float32)
            img += rng.normal(0, 6, img.shape).astype(np.float32)
            yield np.clip(img, 0, 255).astype(np.uint8)

    return write_pyramid_tiled(path, (size, size), strips(), pixel_size_um)


def ensure_section(size: int, out: Path, pixel_size_um: float, generator: str = "synth") -> Path:
    path = out / (f"big_{size}.ome.tif" if generator == "synth" else f"texture_{size}.ome.tif")
    if not path.exists():
        t0 = time.perf_counter()
        tmp = out / f".tmp_{path.name}"
        if generator == "synth":
            from cytonet.synth import write_big_section

            write_big_section(tmp, size, pixel_size_um, seed=0, progress=True)
        else:
            write_texture_section(tmp, size, pixel_size_um)
        tmp.rename(path)  # the phantom's ground-truth PNG keeps the tmp name; it is not used here
        print(f"generated {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8,192² px section, 1,000 patches")
    ap.add_argument("--size", type=int, default=None, help="section side in px (default 40000, quick 8192)")
    ap.add_argument("--count", type=int, default=None, help="patches (default 5000, quick 1000)")
    ap.add_argument("--patch-px", type=int, default=512)
    ap.add_argument("--target-um", type=float, default=2.0, help="patch resolution (full res of the section: 2)")
    ap.add_argument("--shard-patches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--store-reads", type=int, default=2000)
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--generator", choices=("synth", "texture"), default="synth",
                    help="section generator: the phantom (cytonet.synth.write_big_section) or a fast texture")
    ap.add_argument("--stages", default="mask,extract,naive,decode,store")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all stages; the table shows medians")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.stage:  # child
        res = STAGES[a.stage](a)
        Path(a.work, f"{a.stage}.json").write_text(
            json.dumps(res, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
        return 0

    size = a.size or (8192 if a.quick else 40000)
    a.count = a.count or (1000 if a.quick else 5000)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.section = str(ensure_section(size, out, 2.0, a.generator))
    a.work = str(out / f"work_{Path(a.section).name.removesuffix('.ome.tif')}")
    Path(a.work).mkdir(exist_ok=True)
    results: dict = {"machine": machine(), "section": a.section, "size_px": size, "generator": a.generator,
                     "section_file_mb": os.path.getsize(a.section) / 1e6,
                     "params": {"count": a.count, "patch_px": a.patch_px, "target_um": a.target_um,
                                "threads": a.threads, "shard_patches": a.shard_patches}}
    rounds: list[dict] = []
    for r in range(a.repeat):  # whole rounds, so a round's stages run close in time on a shared machine
        rounds.append({})
        for name in a.stages.split(","):
            print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}/{a.repeat} stage {name} ...", flush=True)
            rounds[-1][name] = run_stage(name, a)
            rounds[-1][name]["loadavg_1min"] = os.getloadavg()[0]
    for name in a.stages.split(","):  # per stage: the round with the median wall time
        runs = sorted((rd[name] for rd in rounds), key=lambda x: x.get("wall_s", 0))
        results[name] = runs[len(runs) // 2]
        results[name]["all_wall_s"] = [rd[name].get("wall_s") for rd in rounds]

    rows = []
    gib = 2**30

    def row(name: str, r: dict, n: int | None = None) -> None:
        mbps = r.get("decoded_bytes", 0) / r["wall_s"] / 1e6
        rows.append((name, f"{r['wall_s']:.2f}", f"{n / r['wall_s']:.1f}" if n else "-", f"{mbps:.0f}",
                     f"{r['peak_rss_bytes'] / gib:.2f}"))

    if "mask" in results:
        row("mask", results["mask"])
    if "extract" in results:
        row("extract (cytonet)", results["extract"], results["extract"]["n_patches"])
    if "naive" in results:
        row("naive per-patch", results["naive"], results["naive"]["n_patches"])
    if "decode" in results:
        row("decode limit (full res)", results["decode"])
    summary = {}
    if "extract" in results and "naive" in results:
        per_round = [rd["naive"]["wall_s"] / rd["extract"]["wall_s"] for rd in rounds]
        summary["speedup_vs_naive"] = float(np.median(per_round))  # ratio within each round, then median
        summary["speedup_vs_naive_per_round"] = [round(x, 2) for x in per_round]
    if "extract" in results and "decode" in results:
        summary["extract_wall_over_full_decode"] = results["extract"]["wall_s"] / results["decode"]["wall_s"]
        summary["extract_MBps_over_decode_MBps"] = (
            (results["extract"]["decoded_bytes"] / results["extract"]["wall_s"])
            / (results["decode"]["decoded_bytes"] / results["decode"]["wall_s"]))
    if "mask" in results and "extract" in results:
        summary["peak_rss_mask_extract_gib"] = max(results["mask"]["peak_rss_bytes"],
                                                   results["extract"]["peak_rss_bytes"]) / gib
        summary["rss_ok_lt_2gib"] = summary["peak_rss_mask_extract_gib"] < 2.0
    if "speedup_vs_naive" in summary:
        summary["speedup_ok_ge_3"] = summary["speedup_vs_naive"] >= 3.0
    results["summary"] = summary

    m = results["machine"]
    print(f"\n{a.repeat} round(s), load average (1 min) during extract: "
          f"{[round(rd['extract']['loadavg_1min'], 1) for rd in rounds] if 'extract' in results else '-'}")
    print(f"section {size}x{size} px ({results['section_file_mb']:.0f} MB file), {a.count} patches of "
          f"{a.patch_px} px at {a.target_um} µm/px, {a.threads} workers; {m['nproc']} cores, {m['ram_gib']} GiB, "
          f"{m['cpu_model']}, {m['date']}")
    print(f"{'stage':26s} {'wall s':>8s} {'patch/s':>9s} {'MB/s dec':>9s} {'peak RSS GiB':>13s}")
    for r in rows:
        print(f"{r[0]:26s} {r[1]:>8s} {r[2]:>9s} {r[3]:>9s} {r[4]:>13s}")
    if "store" in results:
        s = results["store"]
        print(f"store reads, one patch at a time: random {s['random']['patches_per_s']:.0f} patch/s "
              f"({s['random']['MB_per_s']:.0f} MB/s), sequential {s['sequential']['patches_per_s']:.0f} patch/s "
              f"({s['sequential']['MB_per_s']:.0f} MB/s)")
    for k, v in summary.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    path = out / f"bench_preprocess{'_quick' if a.quick else ''}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
