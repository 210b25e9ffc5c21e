"""benchmarks/gpu_check.py: the peak table, and its --smoke run on the CPU (the GPU run itself needs a GPU node).

The smoke run is the same code as the GPU check (trunk, infer_section, pretrain(), the training DataLoader,
GPU-hours) with tiny sizes in fp32; these tests check that it runs and that its figures hang together.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_peak_from_device_name_or_environment(monkeypatch):
    monkeypatch.delenv(gpu_check.PEAK_ENV, raising=False)
    assert gpu_check.peak_bf16_flops("NVIDIA A100-SXM4-40GB")[0] == 312e12
    assert gpu_check.peak_bf16_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gpu_check.peak_bf16_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu_check.peak_bf16_flops("NVIDIA H200")[0] == 989e12
    peak, source = gpu_check.peak_bf16_flops("NVIDIA GeForce GTX 1080")
    assert peak is None and gpu_check.PEAK_ENV in source
    monkeypatch.setenv(gpu_check.PEAK_ENV, "400")
    assert gpu_check.peak_bf16_flops("NVIDIA A100-SXM4-40GB") == (400e12, f"${gpu_check.PEAK_ENV}")
    monkeypatch.setenv(gpu_check.PEAK_ENV, "fast")
    with pytest.raises(ValueError, match=gpu_check.PEAK_ENV):
        gpu_check.peak_bf16_flops(None)


def test_full_sizes_come_from_the_cluster_config():
    """The GPU run's sizes are config/jureca.yaml's and bench_infer's cluster geometry, not numbers of its own."""
    cfg = gpu_check.jureca_config()
    geo = gpu_check.bigbrain_assumptions()["assumptions"]
    sizes = gpu_check.sizes_for(False, cfg)
    assert sizes.window_px == geo["window_px"] == 2048 and sizes.trunk_tile_px == geo["tile_px"]
    assert sizes.patch_px == cfg["patches"]["patch_px"] and sizes.batch == cfg["pretrain"]["batch_size"]
    assert sizes.tile_px == cfg["infer"]["tile_px"] and sizes.encoder == cfg["pretrain"]["encoder"] == "resnet50"


def test_out_of_memory_halves_the_tile_and_the_batch(tmp_path, monkeypatch):
    """A tile or batch too big for the device's memory is halved until it fits, and the sizes that failed are
    recorded (simulated here: this machine has no GPU to run out of)."""
    import torch

    import cytonet.learn.pretrain as pretrain_module

    cfg = gpu_check.jureca_config()
    sizes = gpu_check.replace(gpu_check.sizes_for(True, cfg), trunk_tile_px=1024, batch=8, steps=3)
    real_time_trunk, real_pretrain = gpu_check._time_trunk, pretrain_module.pretrain

    def time_trunk(trunk, side, dev, reps):
        if side > 700:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_time_trunk(trunk, side, dev, reps)

    def pretrain(stores, out, config, **kw):
        if config["batch_size"] > 2:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
        return real_pretrain(stores, out, config, **kw)

    monkeypatch.setattr(gpu_check, "_time_trunk", time_trunk)
    monkeypatch.setattr(pretrain_module, "pretrain", pretrain)
    dm = gpu_check.bench_infer.build_model("small", sizes.window_px, sizes.net_um)
    trunk = gpu_check.measure_trunk(dm, sizes, torch.device("cpu"), None)
    assert trunk["tile_cores_out_of_memory"] == [1024, 512] and trunk["tile_core_px"] == 256
    assert trunk["tile_side_px"] == 256 + sizes.window_px + 2 * 96 and trunk["mpix_s"] > 0  # small: 95 px -> 96
    monkeypatch.setenv("CYTONET_PATCH_CACHE_MB", "0")
    store = gpu_check.make_patch_store(sizes, tmp_path)
    train = gpu_check.measure_pretrain(store, cfg, sizes, torch.device("cpu"), tmp_path, None)
    assert train["batches_out_of_memory"] == [8, 4] and train["batch_pairs"] == 2 and train["samples_per_s"] > 0

    def broken(stores, out, config, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(pretrain_module, "pretrain", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # not an allocation failure: raised as it is
        gpu_check.measure_pretrain(store, cfg, sizes, torch.device("cpu"), tmp_path, None)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_smoke_run_on_cpu(tmp_path):
    env = {**os.environ, gpu_check.PEAK_ENV: "50"}  # far above what 2 CPU cores reach in fp32
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert r["smoke"] is True and r["device"] == "cpu" and r["peak_tflops"] == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check_smoke.json", "gpu_check_smoke.md"]  # no work dir

    t, i, p, ld, h = r["trunk"], r["infer"], r["pretrain"], r["loader"], r["gpu_hours"]
    for rate in (t["mpix_s"], t["tflop_s"], i["mpix_s"], p["samples_per_s"], p["end_to_end_samples_per_s"],
                 ld["augment_on_device"]["reads_per_s"], ld["augment_on_loader"]["reads_per_s"]):
        assert _positive(rate), r
    for part in (t, i, p):
        assert 0 < part["share_of_peak"] <= 1, part
    assert t["share_of_peak"] == pytest.approx(t["tflop_s"] / 50, rel=1e-2)
    assert i["n_tiles"] >= 1 and i["trunk_px"] > 0 and p["batch_pairs"] == 2 and p["timed_steps"] >= 1
    # Forward + backward of 2 views is about 3 x 2 x the trunk's FLOPs on a patch (the head adds a little).
    trunk_fwd = t["flop_per_px"] * p["patch_px"] ** 2
    assert 5.5 * trunk_fwd < p["flop_per_sample"] < 7 * trunk_fwd, (p["flop_per_sample"], trunk_fwd)
    assert ld["gpu_demand_reads_per_s"] == pytest.approx(2 * p["samples_per_s"], rel=1e-3)
    assert ld["configured"] == gpu_check.jureca_config()["pretrain"]["augment_on"]

    # GPU-hours: finite, recomputed from the measured rates with bench_infer's cluster geometry.
    for key in ("inference_dense_trunk", "inference_end_to_end", "pretraining_compute", "pretraining_loader_bound"):
        assert _positive(h[key]), h
    assert h["sections"] == 7400 and h["window_px"] == 2048 and h["pretraining_samples"] == 1_000_000
    px = (h["section_um"][0] / h["network_um"]) * (h["section_um"][1] / h["network_um"])
    assert h["inference_dense_trunk"] == pytest.approx(
        h["sections"] * px * h["halo_factor"] / (t["mpix_s"] * 1e6) / 3600, rel=1e-2)
    assert h["pretraining_compute"] == pytest.approx(1e6 / p["samples_per_s"] / 3600, rel=1e-2)
    assert h["pretraining_loader_bound"] >= h["pretraining_compute"]
    assert _positive(h["assumed_a100"]["inference_dense"]) and _positive(h["assumed_a100"]["pretraining"])

    md = (tmp_path / "gpu_check_smoke.md").read_text()
    assert "SMOKE" in md and "| dense trunk (small) |" in md and "GPU-hours per brain (7,400 sections" in md
    assert proc.stdout.strip() == md.strip()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_shell_wrapper_refuses_a_node_without_gpu():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "nvidia-smi not found" in proc.stderr
