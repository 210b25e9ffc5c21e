"""SpatialNCE pretraining: loss maths, 2-rank DDP on gloo, kill-and-resume, and that it learns."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from cytonet.learn.pretrain import (  # noqa: E402
    negative_weights,
    pretrain,
    spatial_nce_logits,
    spatial_nce_loss,
    validate_config,
    weighted_info_nce,
)
from cytonet.nn import distributed as cdist  # noqa: E402
from learning_fixtures import make_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("stores"), "b1", n_sections=4, grid=10, patch_px=32, seed=1)


# --------------------------------------------------------------------------------------------------- loss maths
def test_ntxent_matches_hand_computation() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    far = torch.tensor([[0.0, 0, 0], [10, 0, 0], [20, 0, 0]])  # all pairs far apart: nothing masked
    t = 0.5
    loss, parts = spatial_nce_loss(z1, z2, far, far + 0.1, temperature=t, radius_mm=1.0)
    assert parts["logits"].shape == (6, 6)
    # by hand: SimCLR NT-Xent over 2N = 6 views, positive = the other view, self excluded
    v = F.normalize(torch.cat([z1, z2]), dim=1).tolist()
    total = 0.0
    for i in range(6):
        j = (i + 3) % 6
        sims = {k: sum(a * b for a, b in zip(v[i], v[k])) / t for k in range(6) if k != i}
        total += -sims[j] + math.log(sum(math.exp(s) for s in sims.values()))
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)


def test_radius_mask_removes_near_keys_from_negatives() -> None:
    torch.manual_seed(1)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    xyz = torch.tensor([[0.0, 0, 0], [0.3, 0, 0], [10, 0, 0], [20, 0, 0]])  # anchors 0 and 1 are near
    parts = spatial_nce_logits(z1, z2, xyz, xyz, temperature=0.1)
    w = negative_weights(parts["dist"], "hard", radius_mm=1.0)
    assert w[0, 1] == 0 and w[0, 5] == 0 and w[1, 0] == 0  # near keys (both views) are not negatives
    assert w[0, 2] == 1 and w[0, 7] == 1
    loss, _ = spatial_nce_loss(z1, z2, xyz, xyz, temperature=0.1, radius_mm=1.0)
    # same as removing those columns by hand for query 0 ... computed via the generic weighted form
    loss_nomask, _ = spatial_nce_loss(z1, z2, xyz + torch.arange(4)[:, None] * 100.0,
                                      xyz + torch.arange(4)[:, None] * 100.0, temperature=0.1, radius_mm=1.0)
    assert loss.item() != pytest.approx(loss_nomask.item())
    # changing the embedding of a masked key leaves query 0's loss term unaffected
    logits, pos = parts["logits"].clone(), parts["pos"]
    w2 = w.clone()
    w2[torch.arange(8), parts["self_idx"]] = 0
    l_a = weighted_info_nce(logits[:1], pos[:1], w2[:1])
    logits[0, 1] += 50.0
    assert weighted_info_nce(logits[:1], pos[:1], w2[:1]).item() == pytest.approx(l_a.item())


def test_weighted_variant_reduces_to_plain_with_uniform_weights() -> None:
    torch.manual_seed(2)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    xyz = torch.rand(5, 3)
    parts = spatial_nce_logits(z1, z2, xyz, xyz, temperature=0.2)
    w = torch.ones_like(parts["logits"])
    w[torch.arange(10), parts["self_idx"]] = 0
    plain, _ = spatial_nce_loss(z1, z2, xyz, xyz, temperature=0.2, radius_mm=1e-9)  # radius ~0: no masking
    assert weighted_info_nce(parts["logits"], parts["pos"], w).item() == pytest.approx(plain.item(), rel=1e-6)
    # with σ -> 0 the weighted variant's weights are uniform (1 for any distance > 0)
    weighted, _ = spatial_nce_loss(z1, z2, xyz, xyz, temperature=0.2, variant="weighted", sigma_mm=1e-6)
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-5)


def test_config_rejects_unknown_key() -> None:
    with pytest.raises(ValueError, match="radius_m"):
        validate_config({"radius_m": 1.0})


def _partners(store: Path, positives: str | None, radius_mm: float = 0.6) -> tuple[np.ndarray, np.ndarray, Any]:
    """Partner of every anchor, 5 draws each: (anchor, partner) index pairs, fallback flags and the stores."""
    from cytonet.nn.data import PatchStores, SpatialPairDataset, item_generator

    stores = PatchStores([store])
    kw = {} if positives is None else {"positives": positives}
    ds = SpatialPairDataset(stores, radius_mm, seed=0, **kw)
    pairs, fallback = [], []
    for key in range(5 * len(stores)):
        anchor = key % len(stores)
        other, fb = ds.partner(anchor, item_generator(0, key, 1))
        pairs.append((anchor, other))
        fallback.append(fb)
    return np.array(pairs), np.array(fallback), stores


def test_default_partners_never_share_the_anchors_section(store: Path) -> None:
    """SpatialNCE positives: by default a partner lies on another section (no shared pixels, so pixel matching
    cannot solve the task); the fixture's same-section neighbours at 0.5 mm are within the 0.6 mm radius."""
    assert validate_config({})["positives"] == "other_section"
    pairs, fallback, stores = _partners(store, None)
    section = stores.table["section"].to_numpy()
    xyz = stores.xyz()
    assert not fallback.any()
    assert (pairs[:, 0] != pairs[:, 1]).all()
    assert (section[pairs[:, 0]] != section[pairs[:, 1]]).all()
    assert (np.linalg.norm(xyz[pairs[:, 0]] - xyz[pairs[:, 1]], axis=1) <= 0.6 + 1e-9).all()
    # the old 3D ball draws same-section partners from the same neighbourhood (most of them, here)
    ball, _, _ = _partners(store, "ball")
    assert (section[ball[:, 0]] == section[ball[:, 1]]).mean() > 0.5
    with pytest.raises(ValueError, match="positives"):
        validate_config({"positives": "nearby"})


# ---------------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(store: str, out: str) -> None:
    """Runs in each spawned rank: a few pretraining steps, then a direct check of the gathered negatives."""
    import torch.distributed as dist

    try:
        res = pretrain([store], out, {"steps": 4, "batch_size": 8, "num_workers": 0, "radius_mm": 0.6,
                                      "checkpoint_every": 2, "threads": 1}, return_model=True, progress=False)
        rank = dist.get_rank()
        torch.save(res["model"].state_dict(), Path(out) / f"rank{rank}.pt")
        b = 3
        z = torch.randn(b, 4, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
        xyz = torch.full((b, 3), 100.0 * rank)
        parts = spatial_nce_logits(z, z.flip(1), xyz, xyz, temperature=1.0)
        parts["logits"].sum().backward()
        info = {"train_logits": list(res["logits_shape"]), "probe_logits": list(parts["logits"].shape),
                "key_dist_max": float(parts["dist"].max()), "grad_ok": bool(z.grad.abs().sum() > 0)}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(info))
    finally:
        cdist.cleanup()


def test_ddp_two_ranks_gloo(store: Path, tmp_path: Path) -> None:
    cdist.launch_local(2, _ddp_worker, str(store), str(tmp_path))
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"parameter {k} differs between ranks"
    for r in (0, 1):
        info = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert info["train_logits"] == [2 * 8, 2 * 8 * 2]  # [2 x local batch, 2 x global batch]
        assert info["probe_logits"] == [6, 12]
        assert info["key_dist_max"] > 100  # keys include the other rank's coordinates
        assert info["grad_ok"]
    assert (tmp_path / "encoder.pt").exists()
    log = pd.read_csv(tmp_path / "metrics.csv")
    assert log["step"].tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- kill and resume
def _cmd(store: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "cytonet", "pretrain", "--store", str(store), "--out", str(out), "--no-progress",
            "--param", f"steps={steps}", "--param", "batch_size=4", "--param", "checkpoint_every=5",
            "--param", "num_workers=0", "--param", "radius_mm=0.6", "--threads", "1"]


STEPS = 80


def test_kill_and_resume(store: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(store, out, STEPS), env=env, cwd=ROOT)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step_*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted((out / "checkpoints").glob("step_*.pt"))
    assert ckpts and not (out / "encoder.pt").exists()
    resume_step = torch.load(ckpts[-1], weights_only=False)["step"]
    assert resume_step > 0
    before = pd.read_csv(out / "metrics.csv")
    killed_at = int(before["step"].max())
    assert killed_at >= resume_step
    subprocess.run(_cmd(store, out, STEPS), env=env, cwd=ROOT, check=True, timeout=300)
    log = pd.read_csv(out / "metrics.csv")
    assert log["step"].tolist() == list(range(1, STEPS + 1)), "log must continue from the checkpoint, without repeats"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == STEPS
    assert summary["resumed_from"] == resume_step  # continued from the checkpoint, did not start over
    ck = torch.load(out / "encoder.pt", weights_only=False)
    assert ck["step"] == STEPS
    # the resumed process trained only the remaining steps: its first row's elapsed time restarts near 0
    first_resumed = log[log["step"] == resume_step + 1]["elapsed_s"].item()
    assert first_resumed < log["elapsed_s"].max()
    print(f"killed after step {killed_at}, resumed from checkpoint step {resume_step}")


def test_fresh_run_starts_at_step_zero(store: Path, tmp_path: Path) -> None:
    res = pretrain([store], tmp_path, {"steps": 3, "batch_size": 4, "num_workers": 0, "radius_mm": 0.6, "threads": 1},
                   progress=False)
    assert res["step"] == 3 and res["resumed_from"] == 0
    assert pd.read_csv(tmp_path / "metrics.csv")["step"].tolist() == [1, 2, 3]


def test_changed_settings_train_from_scratch_instead_of_resuming(store: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A rerun with other training settings (what Snakemake does after a config change) must not resume the old
    run's checkpoints; a rerun that changes only runtime keys (workers, logging) resumes."""
    base = {"steps": 4, "batch_size": 4, "num_workers": 0, "radius_mm": 0.6, "threads": 1, "checkpoint_every": 2}
    pretrain([store], tmp_path, base, progress=False)
    same = pretrain([store], tmp_path, {**base, "log_every": 2}, progress=False)
    assert same["resumed_from"] == 4  # nothing left to train
    with caplog.at_level("WARNING", logger="cytonet.learn.pretrain"):
        res = pretrain([store], tmp_path, {**base, "temperature": 0.2}, progress=False)
    assert res["resumed_from"] == 0 and res["step"] == 4
    assert "temperature: 0.1 -> 0.2" in caplog.text and "training from step 0" in caplog.text
    assert pd.read_csv(tmp_path / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]
    kept = [torch.load(p, weights_only=False)["config"]["temperature"] for p in (tmp_path / "checkpoints").glob("*.pt")]
    assert kept and set(kept) == {0.2}  # the old run's checkpoints are gone


# ------------------------------------------------------------------------------------------------------ learning
def _cohens_d(model, store: Path, radius: float) -> tuple[float, float, float]:
    from scipy.spatial import cKDTree

    from cytonet.nn.data import PatchStores, plain

    st = PatchStores([store])
    x = torch.stack([plain(st.read(i)) for i in range(len(st))])
    model.eval()
    with torch.no_grad():
        f = F.normalize(model.features(x), dim=1)
    pairs = np.array(sorted(cKDTree(st.xyz()).query_pairs(radius)))
    rp = np.random.default_rng(0).integers(0, len(st), (2 * len(pairs), 2))
    rp = rp[rp[:, 0] != rp[:, 1]]
    close = (f[pairs[:, 0]] * f[pairs[:, 1]]).sum(1).numpy()
    rand = (f[rp[:, 0]] * f[rp[:, 1]]).sum(1).numpy()
    d = (close.mean() - rand.mean()) / np.sqrt((close.var(ddof=1) + rand.var(ddof=1)) / 2)
    return float(d), float(close.mean()), float(rand.mean())


def test_loss_decreases_and_close_patches_embed_closer(store: Path, tmp_path: Path) -> None:
    from cytonet.nn.checkpoints import load_encoder
    from cytonet.nn.models import build_encoder

    pretrain([store], tmp_path, {"steps": 80, "batch_size": 32, "lr": 3e-3, "radius_mm": 0.6, "temperature": 0.2,
                                 "num_workers": 1, "checkpoint_every": 1000, "threads": 1}, progress=False)
    log = pd.read_csv(tmp_path / "metrics.csv")
    start, end = log["loss"].head(10).mean(), log["loss"].tail(10).mean()
    d, c, r = _cohens_d(load_encoder(tmp_path / "encoder.pt"), store, 0.6)
    torch.manual_seed(0)
    d0, _, _ = _cohens_d(build_encoder("small"), store, 0.6)
    print(f"\nloss first10={start:.3f} last10={end:.3f}; cos close={c:.3f} random={r:.3f}; "
          f"Cohen's d trained={d:.2f} untrained={d0:.2f}; loader wait {log['loader_wait_s'].mean()*1e3:.1f} ms/step, "
          f"step {log['step_s'].mean()*1e3:.1f} ms")
    assert end < start - 0.3
    assert d > 0.8 and d > d0 + 0.3


def test_device_side_augmentation_runs(store: Path, tmp_path: Path) -> None:
    res = pretrain([store], tmp_path, {"steps": 2, "batch_size": 4, "num_workers": 0, "radius_mm": 0.6,
                                       "threads": 1, "augment_on": "device"}, progress=False)
    assert res["step"] == 2 and (tmp_path / "encoder.pt").exists()
