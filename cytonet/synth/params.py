"""Configuration of the demo brains: the keys of the config's ``demo:`` section."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


class DemoConfigError(ValueError):
    """A bad ``demo:`` configuration (unknown key, wrong type or value)."""


@dataclass(frozen=True)
class DemoParams:
    """Parameters of the demo brains (defaults = the built-in demo)."""

    out_dir: str = "demo"  #: where the demo is written (relative to the working directory)
    n_brains: int = 4  #: number of brains in total (known + unknown)
    n_unknown: int = 1  #: how many of them (the last ones) are "unknown" (no annotations)
    sections_per_brain: int = 6  #: sections per brain
    section_spacing_um: float = 400.0  #: distance between consecutive sections along the cutting axis
    annotate_every: int = 2  #: every k-th section of a known brain gets an annotation (first one included)
    pixel_size_um: float = 8.0  #: full-resolution pixel size of the written images
    size_mm: float = 24.0  #: side of the square section image in mm (the phantom brain scales with it)
    seed: int = 0  #: master seed; brains and sections derive their seeds from it
    variation: float = 1.0  #: scale of the inter-brain variation (0 = identical brains up to noise)
    artifacts: bool = True  #: draw tears, folds, bubbles, dust and uneven staining
    cortex_thickness_mm: float = 2.2  #: mean cortical thickness (areas scale around it as sqrt of von Economo's)
    tile_px: int = 256  #: TIFF tile size
    n_jobs: int = 1  #: parallel worker processes for section generation

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any] | None) -> DemoParams:
        """Validate a plain ``demo:`` dict (unknown keys and bad types raise DemoConfigError naming the key)."""
        cfg = dict(cfg or {})
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in cfg.items():
            if key not in known:
                raise DemoConfigError(f"demo: unknown key {key!r} (allowed: {', '.join(sorted(known))})")
            default = getattr(cls, key)
            typ = type(default)
            try:
                if typ is bool:
                    if not isinstance(value, bool):
                        raise TypeError
                elif typ is int:
                    if isinstance(value, bool) or int(value) != value:
                        raise TypeError
                    value = int(value)
                elif typ is float:
                    if isinstance(value, bool):
                        raise TypeError
                    value = float(value)
                else:
                    value = str(value)
            except (TypeError, ValueError):
                raise DemoConfigError(f"demo: key {key!r} must be {typ.__name__}, got {value!r}") from None
            kwargs[key] = value
        p = cls(**kwargs)
        p.check()
        return p

    def check(self) -> None:
        """Raise DemoConfigError on out-of-range values."""
        rules = {
            "n_brains": self.n_brains >= 1,
            "n_unknown": 0 <= self.n_unknown <= self.n_brains,
            "sections_per_brain": self.sections_per_brain >= 1,
            "section_spacing_um": self.section_spacing_um > 0,
            "annotate_every": self.annotate_every >= 1,
            "pixel_size_um": 0.25 <= self.pixel_size_um <= 100,
            "size_mm": 8 <= self.size_mm <= 400,
            "variation": 0 <= self.variation <= 3,
            "cortex_thickness_mm": 0.5 <= self.cortex_thickness_mm <= 5,
            "tile_px": self.tile_px >= 16 and self.tile_px % 16 == 0,
            "n_jobs": self.n_jobs >= 1,
        }
        for key, ok in rules.items():
            if not ok:
                raise DemoConfigError(f"demo: key {key!r} has an invalid value {getattr(self, key)!r}")

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of all keys."""
        return asdict(self)

    def brain_ids(self) -> list[str]:
        """Brain ids ``demo1..demoN``."""
        return [f"demo{i + 1}" for i in range(self.n_brains)]

    def role(self, brain_id: str) -> str:
        """``known`` or ``unknown`` (the last ``n_unknown`` brains are unknown)."""
        idx = self.brain_ids().index(brain_id)
        return "unknown" if idx >= self.n_brains - self.n_unknown else "known"
