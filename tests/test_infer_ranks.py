"""Multi-section, multi-rank inference (cytonet.mapping.ranks, cytonet.mapping.batch): the maps do not depend on the
number of ranks, bad command lines and failing ranks fail the job, a batch job's manifest publishes per section,
and the workflow's batch jobs (infer.sections_per_job > 1) give the maps of one job per section."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from cytonet.mapping import batch as batch_manifest
from cytonet.mapping import infer, ranks
from test_infer import AREAS, PX_UM, T, synth_section, tiny_model
from workflow_helpers import BIN, dry_run_jobs, make_workdir, reference_run, run_snakemake, tiny_config, workflow_env

NAMES = ["sa", "sb", "sc"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Three small sections (PNG + mask) of different seeds, a trained tiny classifier, the areas table."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ranks_inputs")
    out: dict = {"images": [], "masks": [], "ckpt": tmp / "clf.pt", "areas": tmp / "areas.csv"}
    for k, name in enumerate(NAMES):
        image, area, mask = synth_section(192, 512 + 64 * k, seed=k)
        if k == 0:
            torch.save(tiny_model(image, area, steps=30), out["ckpt"])
        Image.fromarray(image).save(tmp / f"{name}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp / f"{name}_mask.png")
        out["images"].append(tmp / f"{name}.png")
        out["masks"].append(tmp / f"{name}_mask.png")
    out["areas"].write_text("area_id,name,color\n" + "".join(f"{i},{n},{c}\n" for i, n, c in AREAS))
    return out


def _args(inputs: dict, out: Path, *extra: str, sections: range | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    infer.configure_parser(parser)
    argv = []
    for k in sections or range(len(NAMES)):
        argv += ["--image", str(inputs["images"][k]), "--mask", str(inputs["masks"][k]), "--name", NAMES[k]]
    argv += ["--classifier", str(inputs["ckpt"]), "--out", str(out), "--areas", str(inputs["areas"]),
             "--pixel-size", str(PX_UM), "--output-um", str(T * PX_UM), "--tile-px", "256", "--threads", "1",
             "--no-progress", *extra]
    return parser.parse_args(argv)


def _maps(out: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    root = zarr.open_group(str(out / f"{name}.ome.zarr"), mode="r")
    return root["0"][...], np.asarray(Image.open(out / f"{name}_areas.png")), root["entropy/0"][...]


@pytest.fixture(scope="module")
def one_rank(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_rank")
    assert infer.run(_args(inputs, out, "--nproc", "1")) == 0
    return out


def test_two_ranks_map_what_one_rank_maps(inputs, one_rank, tmp_path, capfd):
    """2 spawned ranks share 3 sections (rank 0: sa, sc; rank 1: sb) and write the maps of 1 rank."""
    out = tmp_path / "two"
    assert infer.run(_args(inputs, out, "--nproc", "2", "--threads", "2")) == 0
    err = capfd.readouterr().err
    assert "infer rank 0/2 on cpu (1 torch threads): 2 of 3 sections" in err, err[-2000:]
    assert "infer rank 1/2 on cpu (1 torch threads): 1 of 3 sections" in err, err[-2000:]
    for name in NAMES:
        p1, lab1, ent1 = _maps(one_rank, name)
        p2, lab2, ent2 = _maps(out, name)
        assert np.isfinite(p1).any() and p1.shape == p2.shape
        np.testing.assert_allclose(p2, p1, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(ent2, ent1, atol=1e-6, equal_nan=True)
        assert np.array_equal(lab1, lab2)
        assert (out / f"{name}_infer.json").is_file()
    assert len(set(np.unique(_maps(one_rank, "sa")[1])) - {0}) >= 2  # a real map, not one class


def test_shard_takes_every_world_th_section():
    assert ranks.shard(tuple("abcde"), 0, 2) == ("a", "c", "e") and ranks.shard(tuple("abcde"), 1, 2) == ("b", "d")
    assert ranks.shard(tuple("ab"), 2, 3) == ()  # more ranks than sections: a rank with nothing to do
    assert ranks.rank_device(None, 3) == torch.device("cpu")  # no CUDA here
    if not torch.cuda.is_available():
        with pytest.raises(infer.InferenceError, match="no CUDA"):
            ranks.rank_device("cuda", 0)


@pytest.mark.parametrize("flag, extra, message", [
    ("--mask", ["--image", "x.png", "--name", "sd"], "3 --mask for 4 --image; give 4"),
    ("--name", ["--image", "x.png", "--mask", "x_mask.png"], "3 --name for 4 --image; give 4"),
    ("--pixel-size", ["--pixel-size", "1.0"], "2 --pixel-size for 3 --image; give 3 or 1"),
    ("--name", ["--name", "sa"], "4 --name for 3 --image"),
])
def test_mismatched_counts_are_refused(inputs, tmp_path, capsys, flag, extra, message):
    """--mask, --name and --pixel-size come one per --image (--pixel-size also once for all); nothing is written."""
    args = _args(inputs, tmp_path / "out", *extra)
    assert infer.run(args) == 2
    err = capsys.readouterr().err
    assert f"cytonet infer: error: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_duplicate_names_are_refused(inputs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    infer.configure_parser(parser)
    args = parser.parse_args(["--image", "a.png", "--mask", "a.png", "--name", "s", "--image", "b.png", "--mask",
                              "b.png", "--name", "s", "--classifier", "c.pt", "--out", str(tmp_path), "--areas",
                              "areas.csv"])
    assert infer.run(args) == 2
    assert "section name(s) s given twice" in capsys.readouterr().err


def test_a_failing_rank_fails_the_job(inputs, tmp_path, capfd):
    """Rank 1's section has no mask: the job exits with status 2, naming the file, and that section has no
    manifest; a batch job writes no batch manifest."""
    bad = dict(inputs, masks=[inputs["masks"][0], tmp_path / "missing_mask.png", inputs["masks"][2]])
    out = tmp_path / "out"
    batch = tmp_path / "batch.json"
    assert infer.run(_args(bad, out, "--nproc", "2", "--batch-manifest", str(batch))) == 2
    err = capfd.readouterr().err
    assert "cytonet infer: error (rank 1/2): tissue mask" in err and "missing_mask.png" in err, err[-2000:]
    assert not (out / "sb_infer.json").exists() and not batch.exists()
    assert infer.run(_args(bad, tmp_path / "out1", "--nproc", "1")) == 2  # the same in one process


def test_batch_manifest_publishes_each_section(inputs, one_rank, tmp_path):
    """--batch-manifest: no per-section manifest until publish_section writes it from the batch manifest (the
    workflow's infer_section rule); it then says what a one-section job's manifest says."""
    out = tmp_path / "maps"
    batch = tmp_path / "batches" / "0000.json"
    assert infer.run(_args(inputs, out, "--nproc", "2", "--batch-manifest", str(batch))) == 0
    assert not list(out.glob("*_infer.json")) and not batch_manifest.parts_dir(batch).exists()
    doc = json.loads(batch.read_text())
    assert doc["sections"] == NAMES and doc["ranks"] == 2 and len(doc["maps"]) == 3
    for name in NAMES:
        (path,) = batch_manifest.publish_section(batch, name, [out / f"{name}_infer.json"])
        got, want = json.loads(path.read_text()), json.loads((one_rank / f"{name}_infer.json").read_text())
        for volatile in ("seconds", "timings"):
            got.pop(volatile), want.pop(volatile)
        assert got == want
        assert np.array_equal(_maps(out, name)[1], _maps(one_rank, name)[1])
    with pytest.raises(batch_manifest.BatchError, match="no maps of section sz"):
        batch_manifest.publish_section(batch, "sz", [out / "sz_infer.json"])
    (out / "sa_areas.png").unlink()
    with pytest.raises(batch_manifest.BatchError, match="sa_areas.png"):
        batch_manifest.publish_section(batch, "sa", [out / "sa_infer.json"])
    with pytest.raises(batch_manifest.BatchError, match="does not exist"):
        batch_manifest.publish_section(tmp_path / "nope.json", "sa", [out / "sa_infer.json"])


# ------------------------------------------------------------------------------------------- the workflow
@pytest.mark.slow
def test_workflow_batches_map_like_one_job_per_section(tmp_path_factory, tmp_path):
    """infer.sections_per_job 2 with 2 local ranks: one infer job per brain, infer_section publishes each section's
    manifest, the maps equal the reference run's (one job per section), and a changed mask reruns its batch only."""
    ref = reference_run(tmp_path_factory)
    demo = ref / "resources" / "demo"
    bundle = tmp_path / "bundle"  # the reference run's CytoNet classifier: no training in this run
    subprocess.run([str(BIN / "cytonet"), "export-model", str(ref / "results"), "-o", str(bundle), "--areas",
                    str(demo / "areas.csv"), "--brains", str(demo / "brains.csv")],
                   check=True, capture_output=True, env=workflow_env(ref))
    work = make_workdir(tmp_path / "work", tiny_config(model=str(bundle), infer={"sections_per_job": 2},
                                                           launch={"infer_nproc": 2}))
    maps = sorted(p.relative_to(ref) for p in (ref / "results" / "maps" / "cytonet").glob("*/*_infer.json"))
    targets = [str(p) for p in maps]
    assert len(targets) == 4
    assert dry_run_jobs(work, "--", *targets) == {"mask": 4, "infer": 2, "infer_section": 4}
    run_snakemake(work, "--cores", "2", *targets)
    for manifest in maps:
        png = str(manifest).replace("_infer.json", "_areas.png")
        assert (work / png).read_bytes() == (ref / png).read_bytes(), png
        assert json.loads((work / manifest).read_text())["section"] == manifest.name.removesuffix("_infer.json")
    batches = sorted((work / "results" / "infer_batches").glob("*/*.json"))
    assert [p.relative_to(work / "results").as_posix() for p in batches] == [
        "infer_batches/demo1/0000.json", "infer_batches/demo2/0000.json"]
    log = (work / "results" / "logs" / "infer" / "demo1" / "batch0000.log").read_text()
    assert "infer rank 1/2" in log and "1 of 2 sections" in log
    published = (work / "results" / "logs" / "infer" / "demo1" / "demo1_s001.log").read_text()
    assert published == "results/maps/cytonet/demo1/demo1_s001_infer.json: from results/infer_batches/demo1/0000.json\n"
    assert dry_run_jobs(work, "--", *targets) == {}
    mask = work / "results" / "masks" / "demo1" / "demo1_s000.png"
    pixels = np.asarray(Image.open(mask)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]  # a changed mask (a touch alone is not a change: Snakemake checksums it)
    Image.fromarray(pixels).save(mask)
    # its brain's batch is mapped again (both of its sections), the other brain's batch stays
    assert dry_run_jobs(work, "--", *targets) == {"infer": 1, "infer_section": 2}
