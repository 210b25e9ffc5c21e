"""Training across ranks (2 gloo ranks spawned on CPU): synchronised BatchNorm, and finetuning DDP.

A 2-rank job must compute what one process computes on the whole batch: BatchNorm over both ranks' halves,
and a finetune whose global batches are split over the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from cytonet.nn import distributed as cdist  # noqa: E402
from learning_fixtures import make_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- synchronised BatchNorm
def _bn_case(shape: tuple[int, ...], momentum: float | None, seed: int) -> dict[str, torch.Tensor]:
    """Inputs, output weights and an initial BatchNorm state for one case (the same in every process)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    return {"x": torch.randn(shape, generator=g) * 3 + 1.5, "w_out": torch.randn(shape, generator=g),
            "weight": torch.rand(c, generator=g) + 0.5, "bias": torch.randn(c, generator=g),
            "momentum": momentum}


def _make_bn(case: dict, dim: int) -> nn.Module:
    c = case["weight"].numel()
    bn = (nn.BatchNorm1d if dim == 2 else nn.BatchNorm2d)(c, momentum=case["momentum"])
    with torch.no_grad():
        bn.weight.copy_(case["weight"])
        bn.bias.copy_(case["bias"])
    return bn


def _bn_steps(bn: nn.Module, x: torch.Tensor, w_out: torch.Tensor, steps: int = 2) -> dict[str, torch.Tensor]:
    """Two training steps (second on a shifted input), then eval: outputs, gradients and running stats."""
    out: dict[str, torch.Tensor] = {}
    for step in range(steps):
        xi = (x + step).detach().requires_grad_(True)
        bn.zero_grad()
        y = bn(xi)
        (y * w_out).sum().backward()
        out.update({f"y{step}": y.detach(), f"dx{step}": xi.grad, f"dw{step}": bn.weight.grad.clone(),
                    f"db{step}": bn.bias.grad.clone()})
    out.update(running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone(),
               tracked=bn.num_batches_tracked.clone())
    bn.eval()
    out["y_eval"] = bn(x).detach()
    return out


CASES = [((8, 3, 5, 5), 0.1, 4), ((8, 3, 5, 5), None, 4), ((8, 3, 5, 5), 0.1, 3), ((10, 6), 0.1, 3)]  # .., rank-0 rows


def _bn_worker(out_dir: str) -> None:
    import torch.distributed as dist

    env, dev = cdist.init_distributed("cpu")
    try:
        results = []
        for i, (shape, momentum, rows0) in enumerate(CASES):
            case = _bn_case(shape, momentum, seed=i)
            part = slice(0, rows0) if env.rank == 0 else slice(rows0, shape[0])
            bn = cdist.convert_sync_batchnorm(_make_bn(case, len(shape)), dev)
            assert type(bn) is cdist.CpuSyncBatchNorm
            res = _bn_steps(bn, case["x"][part], case["w_out"][part])
            for key in [k for k in res if k.startswith(("dw", "db"))]:
                dist.all_reduce(res[key])  # each rank holds its samples' share of the weight gradient
            results.append(res)
        torch.save(results, Path(out_dir) / f"bn_rank{env.rank}.pt")
    finally:
        cdist.cleanup()


def test_sync_batchnorm_on_two_cpu_ranks_equals_batchnorm_on_the_whole_batch(tmp_path: Path) -> None:
    cdist.launch_local(2, _bn_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"bn_rank{r}.pt") for r in (0, 1)]
    for i, (shape, momentum, rows0) in enumerate(CASES):
        case = _bn_case(shape, momentum, seed=i)
        ref = _bn_steps(_make_bn(case, len(shape)), case["x"], case["w_out"])
        parts = (slice(0, rows0), slice(rows0, shape[0]))
        for r, part in enumerate(parts):
            got = ranks[r][i]
            for key in ("y0", "y1", "dx0", "dx1", "y_eval"):
                assert torch.allclose(got[key], ref[key][part], **TOL), (i, r, key)
            for key in ("dw0", "db0", "dw1", "db1", "running_mean", "running_var"):
                assert torch.allclose(got[key], ref[key], **TOL), (i, r, key, got[key], ref[key])
            assert int(got["tracked"]) == 2
        # What the test guards against: BatchNorm over one rank's rows gives other outputs and statistics.
        alone = _bn_steps(_make_bn(case, len(shape)), case["x"][parts[0]], case["w_out"][parts[0]])
        assert not torch.allclose(alone["y0"], ref["y0"][parts[0]], **TOL)
        assert not torch.allclose(alone["running_var"], ref["running_var"], **TOL)


def test_convert_keeps_state_dict_keys_and_picks_torchs_module_on_cuda() -> None:
    from cytonet.nn.models import build_encoder

    plain = build_encoder("small")
    keys = list(plain.state_dict())
    cpu = cdist.convert_sync_batchnorm(build_encoder("small"), torch.device("cpu"))
    cuda = cdist.convert_sync_batchnorm(build_encoder("small"), torch.device("cuda"))  # conversion needs no GPU
    assert list(cpu.state_dict()) == keys and list(cuda.state_dict()) == keys
    kinds = {type(m) for m in cpu.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {cdist.CpuSyncBatchNorm}
    kinds = {type(m) for m in cuda.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.SyncBatchNorm}
    plain.load_state_dict(cpu.state_dict())  # an encoder trained with SyncBatchNorm loads as a plain one
    assert cdist.use_sync_batchnorm("auto", 1) is False and cdist.use_sync_batchnorm("auto", 2) is True
    assert cdist.use_sync_batchnorm(True, 1) is True and cdist.use_sync_batchnorm(False, 4) is False
    with pytest.raises(ValueError, match="sync_batchnorm"):
        cdist.use_sync_batchnorm("yes", 2)


# ------------------------------------------------------------------------------------ pretraining with SyncBN
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("stores"), "b1", n_sections=4, grid=8, patch_px=32, seed=1)


def _pretrain_worker(store: str, out: str, sync: bool) -> None:
    from cytonet.learn.pretrain import pretrain

    try:
        res = pretrain([store], out, {"steps": 3, "batch_size": 8, "num_workers": 0, "radius_mm": 0.6,
                                      "threads": 1, "sync_batchnorm": sync}, progress=False)
        keep = ("rank", "world_size", "sync_batchnorm", "bn_rank_spread", "step")
        (Path(out) / f"rank{res['rank']}.json").write_text(json.dumps({k: res[k] for k in keep}))
    finally:
        cdist.cleanup()


@pytest.mark.parametrize("sync", [True, False])
def test_pretraining_ranks_share_batchnorm_statistics_only_when_synchronised(store: Path, tmp_path: Path,
                                                                            sync: bool) -> None:
    cdist.launch_local(2, _pretrain_worker, str(store), str(tmp_path), sync)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["rank"] for i in info] == [0, 1] and all(i["world_size"] == 2 and i["step"] == 3 for i in info)
    assert all(i["sync_batchnorm"] is sync for i in info)
    # Running stats of the two ranks just before rank 0's are broadcast: equal when synchronised, else apart.
    spread = info[0]["bn_rank_spread"]
    assert spread == info[1]["bn_rank_spread"]
    assert spread <= 1e-6 if sync else spread > 1e-3, spread
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sync_batchnorm"] is sync and summary["bn_rank_spread"] == spread
    encoder = torch.load(tmp_path / "encoder.pt", weights_only=False)
    assert not any("module." in k for k in encoder["state_dict"])
    from cytonet.nn.checkpoints import load_encoder

    assert load_encoder(tmp_path / "encoder.pt") is not None  # a plain-BatchNorm encoder loads it


# ------------------------------------------------------------------------------------------- finetuning DDP
def test_epoch_draws_split_every_global_batch_over_the_ranks() -> None:
    from cytonet.learn.finetune import EpochDraws

    labels = np.array([0] * 20 + [1] * 5 + [2] * 2)
    for balanced in (True, False):
        one = EpochDraws(labels, 31, 8, balanced, seed=3)
        assert one.global_sizes == [8, 8, 8, 7] and len(one) == 4
        for world in (2, 3):
            ranks = [EpochDraws(labels, 31, 8, balanced, seed=3, rank=r, world=world) for r in range(world)]
            for epoch in (0, 1):
                for d in (one, *ranks):
                    d.set_epoch(epoch)
                whole = list(one)
                shares = [list(d) for d in ranks]
                for k, batch in enumerate(whole):  # the ranks' shares, in rank order, are the one-rank batch
                    assert sum((s[k] for s in shares), []) == batch
                    assert all(abs(len(s[k]) - len(batch) / world) < 1 for s in shares)
                keys = [key for b in whole for _, key in b]
                assert keys == list(range(epoch * 31, epoch * 31 + 31))  # every draw once, keyed by epoch
        assert not np.array_equal(one.order(0), one.order(1))  # a fresh draw per epoch ...
        assert np.array_equal(one.order(1), EpochDraws(labels, 31, 8, balanced, seed=3).order(1))  # ... reproducible
        assert not np.array_equal(one.order(0), EpochDraws(labels, 31, 8, balanced, seed=4).order(0))
    # A last global batch with fewer draws than ranks is dropped (a rank would train on nothing).
    assert EpochDraws(labels, 17, 8, True, 0, rank=1, world=2).global_sizes == [8, 8]
    assert EpochDraws(labels, 17, 8, True, 0).global_sizes == [8, 8, 1]


@pytest.fixture(scope="module")
def known_store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("ft"), "k1", n_sections=5, grid=6, patch_px=32,
                      labelled_sections=(0, 1, 2, 4))


FULL = {"mode": "full", "epochs": 2, "batch_size": 11, "samples_per_epoch": 30, "num_workers": 0, "threads": 1}
LINEAR = {"mode": "linear", "epochs": 3, "batch_size": 10, "samples_per_epoch": 25, "num_workers": 0, "threads": 1}


def _finetune_worker(store: str, out: str, cfg: dict) -> None:
    from cytonet.learn.finetune import finetune

    try:
        res = finetune([store], out, cfg, known_brains={"k1"}, device="cpu", return_model=True)
        torch.save(res.pop("model").state_dict(), Path(out).parent / f"model_rank{res['rank']}.pt")
        (Path(out).parent / f"result_rank{res['rank']}.json").write_text(json.dumps(res))
    finally:
        cdist.cleanup()


def _classifier(path: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(path, weights_only=False)
    return {**{f"encoder.{k}": v for k, v in ck["encoder"].items()}, **{f"head.{k}": v for k, v in ck["head"].items()}}


def _assert_same_classifier(a: Path, b: Path) -> None:
    ca, cb = _classifier(a / "classifier.pt"), _classifier(b / "classifier.pt")
    assert ca.keys() == cb.keys()
    for k in ca:
        assert torch.allclose(ca[k].float(), cb[k].float(), rtol=1e-4, atol=1e-5), (k, (ca[k] - cb[k]).abs().max())
    la, lb = pd.read_csv(a / "finetune_log.csv"), pd.read_csv(b / "finetune_log.csv")
    assert list(la.columns) == list(lb.columns) and len(la) == len(lb)
    for col in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert np.allclose(la[col], lb[col], atol=1e-4, equal_nan=True), (col, la[col].tolist(), lb[col].tolist())
    assert (a / "split.json").read_text() == (b / "split.json").read_text()


def test_full_finetune_on_two_ranks_trains_the_one_rank_classifier(known_store: Path, tmp_path: Path) -> None:
    """Global batch split in two, gradients all-reduced, SyncBatchNorm, augmentation keyed by draw."""
    from cytonet.learn.finetune import finetune

    one = finetune([known_store], tmp_path / "one", {**FULL, "augment": True}, known_brains={"k1"}, device="cpu")
    assert one["world_size"] == 1 and one["sync_batchnorm"] is False
    cdist.launch_local(2, _finetune_worker, str(known_store), str(tmp_path / "two" / "out"), {**FULL, "augment": True})
    two = tmp_path / "two"
    results = [json.loads((two / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["sync_batchnorm"]) for r in results] == [(0, 2, True), (1, 2, True)]
    assert results[0]["history"] == results[1]["history"]  # all-reduced metrics: the same on both ranks
    # Rank 0 alone wrote the outputs, and both ranks hold the classifier it wrote.
    assert sorted(p.name for p in (two / "out").iterdir()) == ["classifier.pt", "finetune_log.csv", "split.json"]
    s0, s1 = (torch.load(two / f"model_rank{r}.pt") for r in (0, 1))
    saved = _classifier(two / "out" / "classifier.pt")
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between the ranks"
        assert torch.equal(s0[k].cpu(), saved[k]), f"{k} differs from classifier.pt"
    _assert_same_classifier(tmp_path / "one", two / "out")
    assert (tmp_path / "one" / "finetune_log.csv").read_text().count("\n") == 3


def test_linear_finetune_cli_on_two_ranks_equals_one_rank(known_store: Path, tmp_path: Path) -> None:
    """`cytonet finetune --nproc 2`: frozen-encoder features computed in shares and gathered, head trained by DDP."""
    from cytonet.learn.finetune import finetune

    finetune([known_store], tmp_path / "one", LINEAR, known_brains={"k1"}, device="cpu")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "cytonet", "finetune", "--store", str(known_store), "--out",
                           str(tmp_path / "two"), "--known-brain", "k1", "--params", json.dumps(LINEAR),
                           "--device", "cpu", "--nproc", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finetune: ") == 1 and "on 2 rank(s)" in proc.stdout, proc.stdout
    assert "SyncBatchNorm on" in proc.stderr and proc.stderr.count("wrote ") == 1, proc.stderr[-3000:]
    _assert_same_classifier(tmp_path / "one", tmp_path / "two")
