"""Overlap of reading and computing in dense inference: one section mapped with prefetching off and on.

    .venv/bin/python benchmarks/bench_infer_pipeline.py [--quick] [--threads 1] [--reps 2] [--out DIR]

The section is the demo-like phantom of benchmarks/bench_infer.py (cytonet.synth, a tiled pyramidal OME-TIFF at
2 µm/px with its tissue mask; 4096² px, 2048² with --quick), mapped by ``cytonet.mapping.infer.infer_section``
with the small encoder (random init, 64 px windows, 16 px output stride, 1024 px tiles). Modes, alternating in
each repetition: ``prefetch`` 0 (read, compute and write in line: the baseline of the same run), ``prefetch`` 4
(a reader thread a few tiles ahead), each with the trunk in NCHW and in channels_last (NHWC). Per run: read s
(the reader's busy time), compute s (network), write s (map writes, in the network's thread), wall s of the tile
loop, and wall / max(read, compute + write): 1.0 is perfect overlap, (read + compute + write) / the same max is
what no overlap costs. Prefetching must give identical maps, NHWC maps within 1e-5 of NCHW (checked).

Also on the CPU: the trunk in NCHW vs channels_last (model and input converted) for 1-channel tiles of the small
encoder and ResNet-50, and dense tiles through the trunk one by one vs as a batch (``tile_batch``).
Results: <out>/bench_infer_pipeline[_quick].json and a Markdown summary on stdout. About 1 min on 2 cores with
the default 2 repetitions (--quick: ~15 s), plus ~15 s (--quick: ~3 s) to write the section the first time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from bench_infer import build_model, machine, make_section  # noqa: E402  (the same section and models)

# (name, prefetch, channels_last): each layout serial (the baseline) and with the reader thread
MODES = [("serial NCHW", 0, False), ("prefetch NCHW", 4, False), ("serial NHWC", 0, True), ("prefetch NHWC", 4, True)]


def map_runs(image: Path, mask: Path, out: Path, reps: int) -> list[dict]:
    """Map the section ``reps`` times per mode, modes alternating so that load drifts hit all of them."""
    import zarr

    from cytonet.mapping import infer

    dm = build_model("small", 64, 2.0)
    dm.rf_margin_px()  # measured once, outside the timings
    runs, probs = [], {}
    for rep in range(reps + 1):  # rep 0 warms up caches, the allocator and the page cache of the TIFF
        for mode, prefetch, nhwc in MODES:
            t0 = time.perf_counter()
            res = infer.infer_section(str(image), str(mask), dm, None, out / mode, name="sec", output_um=32.0,
                                      tile_px=1024, progress=False, overlay=False,
                                      pipeline=infer.PipelineOptions(prefetch=prefetch, channels_last=nhwc))
            total = time.perf_counter() - t0
            p = zarr.open_group(str(res.paths["zarr"]), mode="r")["0"][...]
            if mode in probs and not np.array_equal(p, probs[mode], equal_nan=True):
                raise AssertionError(f"maps differ between two runs of mode {mode}")
            probs[mode] = p
            if rep == 0:
                continue
            t = res.timings
            bound = max(t["read_s"], t["compute_s"] + t["write_s"])  # writes share the network's thread
            runs.append({"mode": mode, "prefetch": prefetch, "channels_last": nhwc, "rep": rep, **t,
                         "section_s": round(total, 3), "tiles": res.n_tiles,
                         "wall_over_max": round(t["map_s"] / bound, 3),
                         "sum_over_max": round((t["read_s"] + t["compute_s"] + t["write_s"]) / bound, 3)})
            print(f"{mode}: {t}", file=sys.stderr)
    for layout in ("NCHW", "NHWC"):
        if not np.array_equal(probs[f"serial {layout}"], probs[f"prefetch {layout}"], equal_nan=True):
            raise AssertionError(f"prefetching changed the maps ({layout})")
    dp = float(np.nanmax(np.abs(probs["prefetch NHWC"] - probs["prefetch NCHW"])))
    if dp > 1e-5:
        raise AssertionError(f"channels_last changed the maps by {dp}")
    return runs


def _time(fn, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layout_row(arch: str, S: int, side: int, reps: int) -> dict:
    """Trunk seconds per 1-channel tile of ``arch``: NCHW vs channels_last, 4 tiles one by one vs as one batch."""
    import torch

    dm = build_model(arch, S, 2.0)
    xf = dm.preprocess(torch.randint(0, 256, (4, side, side), dtype=torch.uint8))
    xc = xf[:1].contiguous(memory_format=torch.channels_last)
    row: dict = {"arch": arch, "tile_px": side}
    with torch.inference_mode():
        dm.trunk.to(memory_format=torch.contiguous_format)
        row["nchw_s"] = _time(lambda: dm.trunk(xf[:1]), reps)
        row["one_by_one_s"] = _time(lambda: [dm.trunk(xf[k:k + 1]) for k in range(4)], reps) / 4
        row["batch4_s"] = _time(lambda: dm.trunk(xf), reps) / 4
        dm.trunk.to(memory_format=torch.channels_last)
        row["channels_last_s"] = _time(lambda: dm.trunk(xc), reps)
    row["channels_last_speedup"] = row["nchw_s"] / row["channels_last_s"]
    row["batch4_speedup"] = row["one_by_one_s"] / row["batch4_s"]
    row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    print(f"{arch}: {row}", file=sys.stderr)
    return row


def layout_runs(quick: bool, reps: int) -> list[dict]:
    """The small encoder on 1024 px tiles (512 quick), ResNet-50 on 384 px (256 quick)."""
    return [layout_row("small", 64, 512 if quick else 1024, reps),
            layout_row("resnet50", 256, 256 if quick else 384, reps)]


def report(meta: dict, section: dict, runs: list[dict], layouts: list[dict]) -> str:
    lines = [f"Machine: {meta['nproc']} cores, {meta['cpu']}, torch {meta['torch']}, load avg {meta['load_avg']}, "
             f"{meta['date']}; {section['threads']} torch thread(s)",
             f"Section: {section['px']}² px at 2 µm/px, {runs[0]['tiles']} tiles of 1024 px (+ halo), small encoder",
             "", "| mode | rep | read s | compute s | write s | wall s | wall / max(read, compute+write) | "
             "sum / max |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['mode']} | {r['rep']} | {r['read_s']:.2f} | {r['compute_s']:.2f} | {r['write_s']:.2f} "
                     f"| {r['map_s']:.2f} | {r['wall_over_max']:.2f} | {r['sum_over_max']:.2f} |")
    lines += ["", "| trunk | tile px | NCHW s | channels_last s | NCHW / CL | 1 by 1 s/tile | batch of 4 s/tile | "
              "1by1 / batch |", "|---|---|---|---|---|---|---|---|"]
    for r in layouts:
        lines.append(f"| {r['arch']} | {r['tile_px']} | {r['nchw_s']:.3f} | {r['channels_last_s']:.3f} | "
                     f"{r['channels_last_speedup']:.2f} | {r['one_by_one_s']:.3f} | {r['batch4_s']:.3f} | "
                     f"{r['batch4_speedup']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2048² px section, smaller layout tiles")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on 2 cores the reader thread gets the other one)")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per mode (after one warm-up run)")
    ap.add_argument("--out", default=str(ROOT / "out" / "infer_pipeline"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    px = 2048 if args.quick else 4096
    t0 = time.perf_counter()
    image, mask = make_section(out / f"section_{px}.ome.tif", px)
    print(f"section ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    meta = machine()
    section = {"px": px, "threads": args.threads, "pixel_size_um": 2.0, "window_px": 64, "output_stride_px": 16,
               "tile_px": 1024}
    runs = map_runs(image, mask, out, args.reps)
    layouts = layout_runs(args.quick, max(2, args.reps))
    summary = {}
    for mode, _, _ in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {k: round(statistics.median(r[k] for r in mine), 3)
                                          for k in ("read_s", "compute_s", "write_s", "map_s", "wall_over_max")}
    doc = {"machine": meta, "section": section, "runs": runs, "summary": summary, "layouts": layouts}
    (out / ("bench_infer_pipeline_quick.json" if args.quick else "bench_infer_pipeline.json")).write_text(
        json.dumps(doc, indent=2))
    print(report(meta, section, runs, layouts))
    print(f"\nmedians: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
