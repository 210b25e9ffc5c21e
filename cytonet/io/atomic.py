"""Atomic file writes: readers never see a half-written output, and a failed write leaves nothing behind.

Every result file of every stage goes through :func:`atomic_path` (torch checkpoints through
``cytonet.nn.checkpoints.atomic_save``, which uses it too).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file 0600; give it the mode any other new file gets (lab members must read results)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """The mode a new file gets under the current umask (0644 with the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (manifests record it; readers check it)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_csv(path: str | os.PathLike, table: Any, index: bool = False) -> Path:
    """DataFrame -> CSV (``\\n`` line ends), atomically."""
    return atomic_write_text(path, table.to_csv(index=index, lineterminator="\n"))


def json_clean(x: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_clean(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """JSON (NaN written as null), atomically."""
    return atomic_write_text(path, json.dumps(json_clean(data), indent=2) + "\n")


def atomic_savefig(fig: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    plt.close(fig)
    return Path(path)


def atomic_write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an array as PNG atomically."""
    from PIL import Image

    with atomic_path(path, suffix=".tmp.png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)
