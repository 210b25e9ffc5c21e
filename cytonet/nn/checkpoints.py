"""Model files: encoder.pt (pretraining), classifier.pt (finetuning) and resumable training checkpoints.

Training writes them, mapping and analysis read them; nobody else knows their layout. Every file is written
atomically, so a killed job never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cytonet.io.atomic import atomic_path
from cytonet.nn.models import autocast, build_encoder, normalize_uint8, prepare_model, to_input

ENCODER_FORMAT = "cytonet-encoder/1"
CLASSIFIER_FORMAT = "cytonet-classifier/1"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace (never a half-written file)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    return sorted((Path(out_dir) / "checkpoints").glob("step_*.pt"))


def load_latest_checkpoint(out_dir: Path) -> dict | None:
    """Newest readable checkpoint, or None (a run without one starts at step 0)."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - an unreadable file must not block resuming from an older one
            warnings.warn(f"{path}: unreadable checkpoint ({exc}); trying an older one", stacklevel=2)
    return None


def load_encoder(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Rebuild the encoder saved in encoder.pt (or a pretraining checkpoint)."""
    ck = torch.load(path, map_location=map_location, weights_only=False)
    spec = ck["spec"]
    model = build_encoder(spec["encoder"], spec["embedding_dim"], spec["proj_hidden"])
    model.load_state_dict(ck.get("state_dict", ck.get("model")))
    return model


class Classifier(nn.Module):
    """Encoder backbone + linear head over its features."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(x))


def load_classifier(checkpoint: str | Path | dict, device: str = "cpu") -> tuple[Classifier, dict]:
    """Rebuild the classifier of classifier.pt; returns (model in eval mode, checkpoint dict)."""
    ck = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu", weights_only=False)
    spec = ck["spec"]
    enc = build_encoder(spec["encoder"], spec["embedding_dim"], spec["proj_hidden"])
    enc.load_state_dict(ck["encoder"])
    model = Classifier(enc, len(ck["area_ids"]))
    model.head.load_state_dict(ck["head"])
    return prepare_model(model, torch.device(device)).eval(), ck


@torch.no_grad()
def predict(checkpoint: str | Path | dict | tuple, patches: np.ndarray, batch_size: int = 64,
            device: str = "cpu") -> np.ndarray:
    """Class probabilities float32 [N, n_areas] (columns in the checkpoint's area_ids order) for uint8 [N,H,W]."""
    model, ck = checkpoint if isinstance(checkpoint, tuple) else load_classifier(checkpoint, device)
    dev = next(model.parameters()).device
    size = ck.get("input_px")
    out = []
    for i in range(0, len(patches), batch_size):
        x = normalize_uint8(torch.as_tensor(np.asarray(patches[i:i + batch_size])))
        if size and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        with autocast(dev):
            logits = model(to_input(x, dev)).float()
        out.append(torch.softmax(logits, dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(ck["area_ids"])), np.float32)
