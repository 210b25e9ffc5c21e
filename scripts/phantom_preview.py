"""Figure for the README: a demo section and a close-up of its cortex beside a real BigBrain crop.

Usage: ``.venv/bin/python scripts/phantom_preview.py --demo-dir resources/demo --out docs/img/demo_vs_bigbrain.png``.
The BigBrain crop is read from ``../shared/data/sections/bigbrain_patch_gyrus.png`` (BigBrain, Amunts et al. 2013,
CC BY-NC-SA 4.0) and drawn downscaled with its attribution; without the shared data the figure has two panels.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, default=ROOT / "resources" / "demo")
    ap.add_argument("--brain", default="demo2")
    ap.add_argument("--section", type=int, default=3, help="section index in the brain's sections.csv")
    ap.add_argument("--crop-mm", type=float, default=7.0, help="side of the close-up")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "demo_vs_bigbrain.png")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(a.demo_dir / a.brain / "sections.csv") as fh:
        row = list(csv.DictReader(fh))[a.section]
    img = tifffile.TiffFile(a.demo_dir / a.brain / row["image"]).pages[0].asarray()
    layer = np.asarray(Image.open(a.demo_dir / a.brain / "truth" / f"{row['section_id']}_layer.png"))
    px_mm = float(row["pixel_size_um"]) / 1000
    n = int(a.crop_mm / px_mm)
    # close-up: the window with the most cortex whose centre lies on the pial side of the cortex
    cortex = ((layer >= 1) & (layer <= 6)).astype(np.float32)
    step = n // 4
    best, at = -1.0, (0, 0)
    for y in range(0, img.shape[0] - n, step):
        for x in range(0, img.shape[1] - n, step):
            c = cortex[y:y + n, x:x + n].mean()
            wm = (layer[y:y + n, x:x + n] == 7).mean()
            if c + 0.5 * min(wm, 0.2) > best:
                best, at = c + 0.5 * min(wm, 0.2), (y, x)
    y, x = at
    real = ROOT.parent / "shared" / "data" / "sections" / "bigbrain_patch_gyrus.png"
    panels = 3 if real.exists() else 2
    fig, ax = plt.subplots(1, panels, figsize=(4.6 * panels, 5.2), dpi=110)
    ax[0].imshow(img[::4, ::4], cmap="gray", vmin=0, vmax=255)
    ax[0].add_patch(plt.Rectangle((x / 4, y / 4), n / 4, n / 4, fill=False, color="#d7301f", lw=1.5))
    ax[0].set_title(f"demo section {row['section_id']} ({img.shape[0] * px_mm:.0f} mm)")
    ax[1].imshow(img[y:y + n, x:x + n], cmap="gray", vmin=0, vmax=255, interpolation="lanczos")
    ax[1].set_title(f"demo close-up ({a.crop_mm:g} mm, {row['pixel_size_um']} µm/px)")
    if panels == 3:
        ax[2].imshow(np.asarray(Image.open(real).convert("L")), cmap="gray", vmin=0, vmax=255)
        ax[2].set_title("real: BigBrain crop (gyrus, sulcal gap)")
        ax[2].text(0.01, -0.05, "BigBrain, Amunts et al. 2013, CC BY-NC-SA 4.0", transform=ax[2].transAxes,
                   fontsize=7, va="top")
    for axis in ax:
        axis.set_axis_off()
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
