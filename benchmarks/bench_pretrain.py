"""Pretraining throughput on this machine: data pipeline alone vs training step alone vs end to end.

    .venv/bin/python benchmarks/bench_pretrain.py            # full: small @ 64/128 px, ResNet-50 @ 512 px and 2048 px
    .venv/bin/python benchmarks/bench_pretrain.py --quick    # < 1 min: small @ 64 px, ResNet-50 @ 256 px

Numbers are pairs/s (one sample = one anchor + partner = 2 patches through the network). "loader" is the
DataLoader alone (KD-tree partner + 2 augmentations, `--workers` processes) with the store decoded into memory
(what PatchStores does for stores under 1 GiB), "chunk reads" the same with one zarr chunk read per patch (the
baseline, and what big stores still do), "step" is
forward+backward+AdamW on ready tensors, "e2e" is `pretrain()` itself; the smaller of loader and step bounds a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cytonet.learn.pretrain import pretrain, spatial_nce_loss  # noqa: E402
from cytonet.nn.data import AnchorSampler, PatchStores, SpatialPairDataset, collate_pairs  # noqa: E402
from cytonet.nn.models import build_encoder  # noqa: E402
from learning_fixtures import make_store  # noqa: E402


def loader_rate(store: Path, batch: int, workers: int, n_batches: int, cache_mb: float | None = None) -> float:
    """Pairs/s of the data pipeline alone (cache_mb=0: one zarr chunk read per patch)."""
    ds = SpatialPairDataset(PatchStores([store], cache_mb=cache_mb), radius_mm=0.6)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=AnchorSampler(len(ds), batch * (n_batches + 1)),
                                         collate_fn=collate_pairs, num_workers=workers, drop_last=True,
                                         persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    n = sum(b["view1"].shape[0] for b, _ in zip(it, range(n_batches)))
    return n / (time.perf_counter() - t)


def step_rate(encoder: str, px: int, batch: int, n_steps: int) -> float:
    """Pairs/s of forward+backward+optimizer on ready tensors (compute ceiling)."""
    torch.manual_seed(0)
    model = build_encoder(encoder, 128).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(2 * batch, 1, px, px)
    xyz = torch.rand(batch, 3) * 10

    def one() -> None:
        z1, z2 = model(x).chunk(2)
        loss, _ = spatial_nce_loss(z1, z2, xyz, xyz + 0.1, 0.1, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()

    one()  # warm-up (allocations, kernel selection)
    t = time.perf_counter()
    for _ in range(n_steps):
        one()
    return batch * n_steps / (time.perf_counter() - t)


def e2e_rate(store: Path, out: Path, encoder: str, batch: int, workers: int, steps: int, threads: int) -> dict:
    """pretrain() itself: mean pairs/s and the share of step time spent waiting for data (after step 1)."""
    import pandas as pd

    pretrain([store], out, {"encoder": encoder, "steps": steps, "batch_size": batch, "num_workers": workers,
                            "radius_mm": 0.6, "checkpoint_every": 10**6, "threads": threads}, progress=False)
    log = pd.read_csv(out / "metrics.csv").iloc[1:]
    total = log["loader_wait_s"].sum() + log["step_s"].sum()
    return {"pairs_per_s": round(batch * len(log) / total, 2),
            "wait_frac": round(log["loader_wait_s"].sum() / total, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="scaled-down run, under a minute")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("CYTONET_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # deliberate: Snakemake/OMP_NUM_THREADS may say otherwise
    # (encoder, patch px, batch, step-timing steps, loader batches, e2e steps)
    # n_steps 0: the step rate is scaled from the previous case of the same encoder by pixel count (conv FLOPs
    # grow linearly with pixels). ResNet-50 training at 2048 px needs ~10 GB of activations per image in fp32,
    # more than this 24 GB machine can give to a batch of 2 pairs, so 2048 px is extrapolated from 512 px.
    cases = ([("small", 64, 32, 3, 5, 6), ("resnet50", 128, 2, 1, 3, 0), ("resnet50", 512, 2, 0, 2, 0)]
             if args.quick else
             [("small", 64, 64, 10, 20, 30), ("small", 128, 32, 5, 10, 15), ("resnet50", 512, 4, 2, 6, 4),
              ("resnet50", 2048, 2, 0, 3, 0)])
    measured: dict[str, tuple[int, float]] = {}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for enc, px, batch, n_steps, n_load, n_e2e in cases:
            store = make_store(Path(tmp) / f"s{px}", "b1", n_sections=2, grid=6, patch_px=px, seed=0)
            ld = loader_rate(store, batch, args.workers, n_load)
            ld_chunks = loader_rate(store, batch, args.workers, n_load, cache_mb=0)
            if n_steps:
                st = step_rate(enc, px, batch, n_steps)
                measured[enc] = (px, st)
            else:
                st = measured[enc][1] * (measured[enc][0] / px) ** 2
            row = {"encoder": enc, "patch_px": px, "batch": batch, "loader_pairs_per_s": round(ld, 2),
                   "loader_chunk_reads_pairs_per_s": round(ld_chunks, 2),
                   "step_pairs_per_s": round(st, 4), "step_measured": bool(n_steps),
                   "bound": "loader" if ld < st else "compute"}
            if n_e2e:
                row["e2e"] = e2e_rate(store, Path(tmp) / f"run{px}{enc}", enc, batch, args.workers, n_e2e, args.threads)
            results.append(row)
            print(json.dumps(row), flush=True)
    info = {"load_avg_1m": round(os.getloadavg()[0], 2), "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.node(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
            "workers": args.workers, "torch": torch.__version__, "cuda": torch.cuda.is_available(), "results": results}
    print(f"\n{'encoder':10} {'px':>5} {'batch':>5} {'loader pairs/s':>15} {'chunk reads':>12} {'step pairs/s':>13} "
          f"{'e2e pairs/s':>12} bound")
    for r in results:
        e2e = r.get("e2e", {}).get("pairs_per_s", "-")
        print(f"{r['encoder']:10} {r['patch_px']:>5} {r['batch']:>5} {r['loader_pairs_per_s']:>15} "
              f"{r['loader_chunk_reads_pairs_per_s']:>12} "
              f"{r['step_pairs_per_s']:>13}{'' if r['step_measured'] else '*'} {e2e:>12} {r['bound']}")
    print(f"({info['date']}, {info['machine']}, {info['cores']} cores, {args.threads} torch threads, "
          f"{args.workers} loader workers, CUDA={info['cuda']}, load average {info['load_avg_1m']}; "
          "loader and step share the same cores here; * = step rate scaled from a smaller patch size)")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
