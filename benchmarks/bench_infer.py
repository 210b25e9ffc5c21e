"""Benchmark whole-section inference: dense (shared features) vs naive per-window vs MONAI sliding window.

    .venv/bin/python benchmarks/bench_infer.py [--quick] [--threads N] [--out benchmarks/out/infer]

Each case runs in its own subprocess so that its peak RSS is its own. Per case:
- dense: ``cytonet.mapping.infer.infer_section`` end to end (reads, trunk, pooling, head, OME-Zarr/PNG writes);
- naive: the per-window path on a random subset of tissue locations (whole windows through the network, batched),
  extrapolated by the per-location cost to all tissue locations; the subset is also compared with the dense
  probabilities at the same locations (max |Δp|, argmax agreement);
- MONAI ``sliding_window_inference`` on a crop (it has no tissue mask and keeps the whole output in memory).
  A patch classifier returns one vector per window, MONAI stitches dense maps: the wrapper broadcasts the window's
  softmax over an (S/T)×(S/T) block of the output grid (MONAI's zoomed-output mode) with overlap 1 - T/S, so MONAI
  averages the probabilities of all windows covering a cell (a box-blurred map, not per-window values). It runs
  the network once per window like naive, over every window of the crop (no mask), plus the stitching.

MPix/s = input pixels (section area at the network resolution) / second. Ideal speed-up = S² / max(T, s)².
Results go to <out>/bench_infer.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A100 assumption for the GPU-hour extrapolation (see report()).
A100_BF16_PEAK = 312e12
A100_ACHIEVED = 0.15  # fraction of bf16 peak a PyTorch ResNet-50 conv trunk reaches on big tiles (conservative)


# --------------------------------------------------------------------------------------------- inputs
def make_section(path: Path, size: int) -> tuple[Path, Path]:
    """Phantom section via cytonet.synth.write_big_section (tiled pyramidal OME-TIFF + ds16 tissue mask)."""
    from cytonet.synth.big import write_big_section

    mask = path.with_name(path.name.replace(".ome.tif", "_tissue_ds16.png"))
    if not (path.exists() and mask.exists()):
        write_big_section(path, size, 2.0)
    return path, mask


def build_model(arch: str, S: int, um: float):
    """Random-init classifier as a DenseModel: 'small' = cytonet.nn.models.SmallResNet, 'resnet50' = torchvision."""
    import torch
    from torch import nn

    from cytonet.mapping import infer as infer

    torch.manual_seed(0)
    ids, names = [1, 2, 3, 4], ["A1", "A2", "A3", "A4"]
    if arch == "small":
        from cytonet.nn.models import SmallResNet

        bb = SmallResNet()
        m = nn.Module()
        m.trunk, m.net_stride = infer._split_backbone(bb)
        m.head = nn.Linear(bb.out_dim, 4)
    else:
        from torchvision.models import resnet50

        m = resnet50(weights=None, num_classes=4)
        m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    m.eval()
    return infer.as_dense_model(m, window_px=S, pixel_size_um=um, area_ids=ids, area_names=names)


def trunk_flops_per_px(dm, side: int = 512) -> float:
    """FLOPs (2 per multiply-add) of the trunk per input pixel, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        dm.trunk(torch.zeros(1, 1, side, side))
    return fc.get_total_flops() / side ** 2


# ----------------------------------------------------------------------------------------------- one case
def run_case(spec: dict) -> dict:
    """Run one case in this process; returns its figures (peak RSS of this process included)."""
    import torch
    import zarr

    from cytonet.mapping import infer as infer

    torch.set_num_threads(spec["threads"])
    S, T, um = spec["S"], spec["T"], spec["net_um"]
    dm = build_model(spec["arch"], S, um)
    res: dict = {k: spec[k] for k in ("name", "arch", "S", "T", "net_um", "image_px")}
    res["net_stride"] = dm.net_stride
    res["ideal_speedup"] = S ** 2 / max(T, dm.net_stride) ** 2
    res["ideal_per_location"] = S ** 2 / T ** 2  # naive cost S² per location vs dense T² of area per location
    res["flop_per_px"] = trunk_flops_per_px(dm)
    t0 = time.perf_counter()
    res["rf_margin_px"] = dm.rf_margin_px()
    res["rf_measure_s"] = time.perf_counter() - t0
    out = Path(spec["out"]) / spec["name"]
    t0 = time.perf_counter()
    r = infer.infer_section(spec["image"], spec["mask"], dm, None, out, name="sec", output_um=T * um,
                            tile_px=spec["tile_px"], mode="dense", halo_px=spec.get("halo_px"), progress=False,
                            overlay=spec.get("overlay", True))
    res["dense_s"] = time.perf_counter() - t0
    info = json.loads(r.paths["manifest"].read_text())
    H, W = (int(v) for v in spec["net_shape"])
    res.update(net_shape=[H, W], grid=info["grid_shape"], n_locations=info["n_tissue_locations"],
               n_tiles=info["n_tiles"], trunk_px=info["trunk_px"])
    res["dense_mpix_s"] = H * W / res["dense_s"] / 1e6
    res["dense_trunk_gflop_s"] = info["trunk_px"] * res["flop_per_px"] / res["dense_s"] / 1e9
    probs = zarr.open_group(str(r.paths["zarr"]), mode="r")["0"]

    # naive on a subset of tissue locations
    from cytonet.io.readers import open_section

    img = open_section(spec["image"]).read(um)
    grid = infer.Grid(H, W, T, S, dm.net_stride, 0)
    tissue = ~np.isnan(probs[0][...])
    ii, jj = np.nonzero(tissue)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(ii), size=min(spec["naive_n"], len(ii)), replace=False)
    batch = max(1, (1 << 22) // (S * S))
    # Windows are read before the clock starts: naive is timed on preprocessing + network only (favours naive;
    # dense is timed end to end, reads and writes included), so the speed-ups below are conservative.
    wins_all = np.stack([infer._read(img, int(grid.win0(ii[k])), int(grid.win0(jj[k])), S, S) for k in pick])
    t0 = time.perf_counter()
    pn = []
    for a in range(0, len(pick), batch):
        with torch.no_grad():
            x = dm.preprocess(torch.from_numpy(wins_all[a:a + batch]))
            pn.append(torch.softmax(dm.classify(x), 1).numpy())
    naive_s = time.perf_counter() - t0
    pn = np.concatenate(pn)
    pd_ = probs.get_orthogonal_selection((slice(None),))[:, ii[pick], jj[pick]].T
    res["naive_subset"] = int(len(pick))
    res["naive_s_per_location"] = naive_s / len(pick)
    res["naive_s_extrapolated"] = res["naive_s_per_location"] * res["n_locations"]
    res["naive_mpix_s"] = H * W / res["naive_s_extrapolated"] / 1e6
    res["speedup"] = res["naive_s_extrapolated"] / res["dense_s"]
    res["speedup_vs_ideal"] = res["speedup"] / res["ideal_speedup"]
    res["subset_max_dp"] = float(np.abs(pd_ - pn).max())
    res["subset_argmax_agreement"] = float((pd_.argmax(1) == pn.argmax(1)).mean())

    if spec.get("monai_crop"):
        res.update(monai_case(dm, img, spec["monai_crop"], S, T))
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def monai_case(dm, img, crop: int, S: int, T: int) -> dict:
    """MONAI sliding_window_inference with a broadcasting wrapper on a crop centred in the section."""
    import torch
    from monai.inferers import sliding_window_inference

    H, W = img.shape
    y0, x0 = max(0, H // 2 - crop // 2), max(0, W // 2 - crop // 2)
    arr = np.asarray(img[y0:y0 + crop, x0:x0 + crop].compute())
    x = dm.preprocess(torch.from_numpy(arr)[None])
    k = S // T

    def predictor(w: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(dm.classify(w), 1)
        return p[:, :, None, None].repeat(1, 1, k, k)  # class vector over the window, at output resolution

    t0 = time.perf_counter()
    with torch.no_grad():
        out = sliding_window_inference(x, roi_size=(S, S), sw_batch_size=max(1, (1 << 22) // (S * S)),
                                       predictor=predictor, overlap=1 - T / S, mode="constant",
                                       padding_mode="constant", progress=False)
    sec = time.perf_counter() - t0
    n_windows = (max(crop - S, 0) // T + 1) ** 2
    return {"monai_crop_px": crop, "monai_s": sec, "monai_mpix_s": crop * crop / sec / 1e6,
            "monai_windows": n_windows, "monai_s_per_window": sec / n_windows,
            "monai_out_shape": list(out.shape)}


# ------------------------------------------------------------------------------------------------- driver
def cases(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {"threads": args.threads, "out": str(out)}
    if args.quick:
        img, mask = make_section(out / "quick_2048.ome.tif", 2048)
        return [
            {**base, "name": "quick-small", "arch": "small", "S": 64, "T": 16, "net_um": 2.0, "image": str(img),
             "mask": str(mask), "tile_px": 1024, "naive_n": 128, "monai_crop": 256},
            {**base, "name": "quick-resnet50", "arch": "resnet50", "S": 256, "T": 32, "net_um": 8.0,
             "image": str(img), "mask": str(mask), "tile_px": 512, "naive_n": 8, "monai_crop": 320,
             "overlay": False},
        ]
    demo, dmask = make_section(out / "demo_4096.ome.tif", 4096)
    big, bmask = make_section(out / "big_20480.ome.tif", 20480)
    # Network resolutions are chosen so that the whole run fits ~10 min on 2 CPU cores; the big section is read
    # lazily from its 20480² px (2 µm) pyramid and downsampled tile by tile.
    return [
        {**base, "name": "demo-small", "arch": "small", "S": 64, "T": 16, "net_um": 2.0, "image": str(demo),
         "mask": str(dmask), "tile_px": 2048, "naive_n": 1024, "monai_crop": 1024},
        {**base, "name": "demo-resnet50", "arch": "resnet50", "S": 256, "T": 32, "net_um": 4.0, "image": str(demo),
         "mask": str(dmask), "tile_px": 4096, "naive_n": 32, "monai_crop": 384},
        {**base, "name": "big-small", "arch": "small", "S": 64, "T": 16, "net_um": 4.0, "image": str(big),
         "mask": str(bmask), "tile_px": 4096, "naive_n": 1024},
        {**base, "name": "big-resnet50", "arch": "resnet50", "S": 256, "T": 32, "net_um": 16.0, "image": str(big),
         "mask": str(bmask), "tile_px": 4096, "naive_n": 32},
        # halo_px=0: tiles carry only the window, not the receptive-field margin (cytonet.mapping.infer docstring, 4.)
        {**base, "name": "demo-resnet50-halo0", "arch": "resnet50", "S": 256, "T": 32, "net_um": 4.0,
         "image": str(demo), "mask": str(dmask), "tile_px": 4096, "naive_n": 32, "halo_px": 0},
        {**base, "name": "big-resnet50-halo0", "arch": "resnet50", "S": 256, "T": 32, "net_um": 16.0,
         "image": str(big), "mask": str(bmask), "tile_px": 4096, "naive_n": 32, "halo_px": 0},
    ]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "load_avg": os.getloadavg(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def extrapolate_bigbrain(results: list[dict]) -> dict:
    """GPU-hours for a BigBrain-scale brain on A100s from the trunk FLOPs per pixel (see the assumptions)."""
    r50 = next((r for r in results if r["arch"] == "resnet50"), None)
    if r50 is None:
        return {}
    flop_px = r50["flop_per_px"]
    S, T_um, net_um, margin = 2048, 64.0, 2.0, r50["rf_margin_px"]
    tile = 8192
    sections, h_um, w_um = 7400, 100_000, 130_000  # ~100k x 130k px at 1 µm
    px = (h_um / net_um) * (w_um / net_um)
    halo = ((tile + S + 2 * (-(-margin // 32) * 32)) / tile) ** 2
    flop_section = px * flop_px * halo
    achieved = A100_BF16_PEAK * A100_ACHIEVED
    gpu_h = sections * flop_section / achieved / 3600
    T = T_um / net_um
    naive_flop_section = px / T ** 2 * S ** 2 * flop_px
    cpu_flops = r50["dense_trunk_gflop_s"] * 1e9
    return {"assumptions": {
        "sections": sections, "section_um": [h_um, w_um], "network_um": net_um, "window_px": S,
        "output_um": T_um, "output_stride_px": T, "tile_px": tile, "halo_factor": round(halo, 3),
        "tissue_fraction": 1.0, "trunk_flop_per_px": round(flop_px), "a100_bf16_peak_flops": A100_BF16_PEAK,
        "a100_achieved_fraction": A100_ACHIEVED, "io_decode": "not included (overlaps with compute)"},
        "dense_gpu_hours": round(gpu_h, 1), "dense_node_hours_4xA100": round(gpu_h / 4, 1),
        "naive_gpu_hours": round(sections * naive_flop_section / achieved / 3600),
        "measured_cpu_trunk_gflop_s": round(cpu_flops / 1e9, 1),
        "a100_over_this_cpu": round(achieved / cpu_flops),
        "cpu_core_hours_dense": round(sections * flop_section / cpu_flops / 3600 * (os.cpu_count() or 1))}


def report(results: list[dict], meta: dict, bigbrain: dict) -> str:
    lines = [f"Machine: {meta['nproc']} cores, {meta['cpu']}, torch {meta['torch']}, load avg {meta['load_avg']}, "
             f"{meta['date']}", "",
             "| case | image px (net res) | S | T | s | locations | dense MPix/s | naive MPix/s (extrap.) | "
             "speed-up | ideal S²/max(T,s)² | of ideal | S²/T² | MONAI MPix/s | max Δp / agree (subset) | "
             "peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mon = f"{r['monai_mpix_s']:.3f}" if "monai_mpix_s" in r else "-"
        lines.append(f"| {r['name']} | {r['net_shape'][0]}x{r['net_shape'][1]} | {r['S']} | {r['T']} | "
                     f"{r['net_stride']} | {r['n_locations']} | {r['dense_mpix_s']:.3f} | {r['naive_mpix_s']:.4f} | "
                     f"{r['speedup']:.1f}x | {r['ideal_speedup']:.0f}x | {r['speedup_vs_ideal']:.2f} | "
                     f"{r['ideal_per_location']:.0f}x | {mon} | "
                     f"{r['subset_max_dp']:.3f} / {r['subset_argmax_agreement']:.3f} | {r['peak_rss_mb']:.0f} |")
    if bigbrain:
        lines += ["", f"BigBrain extrapolation: {json.dumps(bigbrain)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run all cases (each in a subprocess) and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small inputs, < 1 min")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per case")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "infer"))
    ap.add_argument("--only", help="run only the case with this name")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: JSON spec of one case
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    meta = machine()
    results = []
    for spec in cases(args):
        if args.only and spec["name"] != args.only:
            continue
        from cytonet.io.readers import open_section

        sec = open_section(spec["image"])
        f = sec.pixel_size_um / spec["net_um"]
        spec["image_px"] = list(sec.levels[0].shape)
        spec["net_shape"] = [round(sec.levels[0].shape[0] * f), round(sec.levels[0].shape[1] * f)]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(f"{r['name']}: dense {r['dense_s']:.1f} s, speed-up {r['speedup']:.1f}x "
              f"(ideal {r['ideal_speedup']:.0f}x), RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
    bigbrain = extrapolate_bigbrain(results)
    out = Path(args.out) / ("bench_infer_quick.json" if args.quick else "bench_infer.json")
    out.write_text(json.dumps({"machine": meta, "results": results, "bigbrain": bigbrain}, indent=2))
    print(report(results, meta, bigbrain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
