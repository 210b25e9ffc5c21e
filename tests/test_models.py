"""Encoders, augmentations, patch-store data access, sampler sharding and launcher env detection."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from cytonet.nn.data import AnchorSampler, PatchStores, SpatialPairDataset, augment, plain  # noqa: E402
from cytonet.nn.distributed import detect_env, local_world_size, slurm_port  # noqa: E402
from cytonet.nn.models import build_encoder, normalize_uint8  # noqa: E402
from learning_fixtures import make_store  # noqa: E402


@pytest.mark.parametrize("name,px", [("small", 64), ("resnet50", 64), ("resnet101", 32)])
def test_encoders_single_channel(name: str, px: int) -> None:
    model = build_encoder(name, embedding_dim=16).eval()
    assert model.backbone.conv1.in_channels == 1 if name != "small" else model.backbone.stem[0].in_channels == 1
    x = normalize_uint8(torch.randint(0, 255, (2, px, px), dtype=torch.uint8))
    with torch.no_grad():
        assert model(x).shape == (2, 16)
        assert model.features(x).shape == (2, model.feature_dim)
    assert model.feature_dim == (2048 if name != "small" else 128)


def test_unknown_encoder_named() -> None:
    with pytest.raises(ValueError, match="vgg"):
        build_encoder("vgg", 8)


def test_augment_shape_and_determinism() -> None:
    patch = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    a = augment(patch, torch.Generator().manual_seed(3))
    b = augment(patch, torch.Generator().manual_seed(3))
    c = augment(patch, torch.Generator().manual_seed(4))
    assert a.shape == (1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment(patch, torch.Generator().manual_seed(3), out_px=24).shape == (1, 24, 24)
    assert plain(patch).shape == (1, 32, 32)


def test_sampler_shards_ranks_and_resumes() -> None:
    s = [AnchorSampler(50, 30, rank=r, world_size=2, seed=1) for r in (0, 1)]
    for x in s:
        x.set_epoch(2)
    draws = [list(x) for x in s]
    keys = [k for d in draws for _, k in d]
    assert len(keys) == len(set(keys)) == 60  # disjoint and complete
    assert draws[0] == list(s[0])  # deterministic
    s[0].set_epoch(3)
    assert list(s[0]) != draws[0]
    s[0].set_epoch(2, start=10)
    assert list(s[0]) == draws[0][10:]  # resume skips exactly the consumed draws


def test_store_reads_lazily_in_workers(tmp_path: Path) -> None:
    p = make_store(tmp_path, "b1", n_sections=2, grid=4, patch_px=16)
    st = PatchStores([p])
    assert st._arrays is None and len(st) == 32 and st.patch_px == 16
    st.read(0)
    assert st._arrays is not None
    assert pickle.loads(pickle.dumps(st))._arrays is None  # open handles never travel to workers
    ds = SpatialPairDataset(st, radius_mm=0.6)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=AnchorSampler(len(st), 8),
                                         num_workers=2, collate_fn=lambda items: items)
    items = [it for batch in loader for it in batch]
    assert len(items) == 8 and items[0]["view1"].shape == (1, 16, 16)
    assert all(float((it["xyz1"] - it["xyz2"]).norm()) < 0.6 for it in items)


def test_small_stores_are_cached_in_memory_with_the_same_pixels(tmp_path: Path) -> None:
    import zarr

    p = make_store(tmp_path, "b1", n_sections=2, grid=4, patch_px=16)
    cached, lazy = PatchStores([p]), PatchStores([p], cache_mb=0)
    a, b = cached.read(5), lazy.read(5)
    assert isinstance(cached._arrays[0], np.ndarray) and isinstance(lazy._arrays[0], zarr.Array)
    assert np.array_equal(a, b) and a.shape == (16, 16)
    a[:] = 0  # a read is a copy: changing it leaves the cache intact
    assert np.array_equal(cached.read(5), b)


def test_partner_fallback_counted(tmp_path: Path) -> None:
    p = make_store(tmp_path, "b1", n_sections=1, grid=3, patch_px=16, spacing_mm=5.0)
    ds = SpatialPairDataset(PatchStores([p]), radius_mm=1.0)
    assert all(bool(ds[(i, i)]["fallback"]) for i in range(9))


def test_detect_env_torchrun_slurm_none() -> None:
    e = detect_env({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (e.rank, e.local_rank, e.world_size, e.master_addr, e.master_port) == (1, 1, 4, "h", 1234)
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "nodeA,nodeB",
           "SLURM_JOB_ID": "4242", "PATH": "/nonexistent"}  # no scontrol on PATH: plain list fallback
    e = detect_env(env)
    assert (e.rank, e.local_rank, e.world_size, e.launcher) == (5, 1, 8, "slurm")
    assert e.master_addr == "nodeA" and e.master_port == slurm_port(env) == detect_env(env).master_port
    assert detect_env({}).world_size == 1 and detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1


def test_partners_within_radius_and_across_sections(tmp_path: Path) -> None:
    p = make_store(tmp_path, "b1", n_sections=3, grid=4, patch_px=16, spacing_mm=0.5, section_mm=0.4)
    ds = SpatialPairDataset(PatchStores([p]), radius_mm=0.6)
    gen = torch.Generator().manual_seed(0)
    partners = [ds.partner(i % len(ds), gen) for i in range(200)]
    d = [np.linalg.norm(ds.xyz[i % len(ds)] - ds.xyz[j]) for i, (j, _) in enumerate(partners)]
    assert max(d) < 0.6 and not any(fb for _, fb in partners)
    assert any(ds.xyz[i % len(ds)][2] != ds.xyz[j][2] for i, (j, _) in enumerate(partners))  # other sections too


def test_local_world_size() -> None:
    assert local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_world_size({"SLURM_NTASKS_PER_NODE": "4(x2)"}) == 4
    assert local_world_size({}, default=3) == 3


def test_augment_tensor_input_matches_numpy() -> None:
    patch = np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8)
    a = augment(patch, torch.Generator().manual_seed(7))
    b = augment(torch.from_numpy(patch), torch.Generator().manual_seed(7))  # the device-side path's input
    assert torch.allclose(a, b)
