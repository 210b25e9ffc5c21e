"""Section pixel → 3D reference space (mm) transforms.

A transform is either 12 numbers, the row-major 3×4 affine that maps full-resolution pixel coordinates
``(col, row, 0, 1)`` to ``(x, y, z)`` in mm, or a path to an ``.npz`` with key ``affine`` (3×4) and optional
``field`` (float32 [3, h, w], a displacement in mm added after the affine, sampled every ``field_step_px``
full-resolution pixels and interpolated bilinearly).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import map_coordinates


class TransformError(ValueError):
    """A transform specification cannot be parsed or loaded."""


@dataclass(frozen=True)
class SectionTransform:
    """Maps full-resolution pixel coordinates of one section to 3D reference coordinates in mm."""

    affine: np.ndarray  # (3, 4)
    field: np.ndarray | None = None  # (3, h, w) mm
    field_step_px: float = 1.0

    @classmethod
    def from_spec(cls, spec: str, base_dir: str | Path = ".") -> SectionTransform:
        """Parse a sections-table ``transform`` cell (12 numbers or a path to an .npz)."""
        spec = str(spec).strip()
        parts = spec.replace(",", " ").split()
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = None
        if values is not None:
            if len(values) != 12:
                raise TransformError(f"expected 12 numbers (3x4 affine), got {len(values)}: {spec!r}")
            return cls(np.asarray(values, dtype=np.float64).reshape(3, 4))
        path = Path(spec)
        path = path if path.is_absolute() else Path(base_dir) / path
        if not path.is_file():
            raise TransformError(f"transform file not found: {path}")
        try:
            with np.load(path) as data:
                affine = np.asarray(data["affine"], dtype=np.float64).reshape(3, 4)
                field = np.asarray(data["field"], dtype=np.float32) if "field" in data else None
                step = float(data["field_step_px"]) if "field_step_px" in data else 1.0
        except (OSError, KeyError, ValueError) as exc:
            raise TransformError(f"cannot read transform {path}: {exc}") from exc
        if field is not None and (field.ndim != 3 or field.shape[0] != 3):
            raise TransformError(f"transform {path}: field must be [3, h, w], got {field.shape}")
        return cls(affine, field, step)

    def to_mm(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Map pixel coordinates (full resolution, any shape) to an (N, 3) array of mm coordinates."""
        cols = np.asarray(cols, dtype=np.float64).ravel()
        rows = np.asarray(rows, dtype=np.float64).ravel()
        xyz = cols[:, None] * self.affine[:, 0] + rows[:, None] * self.affine[:, 1] + self.affine[:, 3]
        if self.field is not None:
            coords = np.stack([rows / self.field_step_px, cols / self.field_step_px])
            for axis in range(3):
                xyz[:, axis] += map_coordinates(self.field[axis], coords, order=1, mode="nearest")
        return xyz

    def to_spec(self) -> str:
        """The 12-number text form of the affine part (for writing sections tables)."""
        return " ".join(f"{v:.9g}" for v in self.affine.ravel())
