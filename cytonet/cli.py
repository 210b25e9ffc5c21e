"""The ``cytonet`` command line: one sub-command per pipeline stage.

Each sub-command lives in its stage module, which defines ``configure_parser(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so light commands (masking, patches) never import torch.
Logging is set up once here: ``cytonet -v COMMAND ...`` shows debug lines, ``cytonet -q COMMAND ...`` only warnings.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from cytonet.io.logs import setup_logging

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("cytonet.io.config", "validate a config file and its brain/section/area tables"),
    "make-demo": ("cytonet.synth.cli", "generate the demo brains (or one brain, or a benchmark section)"),
    "mask": ("cytonet.preprocess.mask", "compute the tissue mask of an image or a section"),
    "patches": ("cytonet.preprocess.patches", "sample and extract patches of one brain into a Zarr store"),
    "pretrain": ("cytonet.learn.pretrain", "SpatialNCE pretraining of an encoder on patch stores (torchrun/srun)"),
    "finetune": ("cytonet.learn.finetune", "train an area classifier on the labelled patches of the known brains"),
    "export-model": ("cytonet.learn.export", "write a trained classifier as a model bundle (safetensors + card)"),
    "evaluate": ("cytonet.analysis.evaluate", "classification metrics of the models on known and unknown brains"),
    "infer": ("cytonet.mapping.infer", "map a whole section: probability, area and entropy maps"),
    "smooth3d": ("cytonet.mapping.smooth3d", "make the area maps of neighbouring sections consistent in 3D"),
    "section-metrics": ("cytonet.analysis.section_metrics", "pixel-level per-area F1/IoU of one section's area map"),
    "embed": ("cytonet.analysis.embed", "UMAP of the pretrained features, area clusters and FA-PB separation"),
    "aggregate": ("cytonet.analysis.aggregate", "per-brain and overall metric tables, maps index and montages"),
    "annotation-to-labels": ("cytonet.exchange.annotation_to_labels", "QuPath GeoJSON annotations -> label image"),
    "map-to-geojson": ("cytonet.exchange.map_to_geojson", "area map -> QuPath-importable GeoJSON polygons"),
}


def package_version() -> str:
    """The installed distribution's version; ``cytonet.__version__`` when run from a tree that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cytonet")
    except PackageNotFoundError:
        from cytonet import __version__

        return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser; only ``command``'s own options are built (its module is imported)."""
    parser = argparse.ArgumentParser(prog="cytonet", description=__doc__.splitlines()[0])
    # Own dests: a sub-command may have a --quiet of its own (embed), whose default would overwrite ours.
    parser.add_argument("-v", "--verbose", action="count", default=0, dest="log_verbose",
                        help="more log lines (-v: debug lines of cytonet, -vv: of every library too)")
    parser.add_argument("-q", "--quiet", action="count", default=0, dest="log_quiet",
                        help="fewer log lines (-q: warnings only, -qq: errors only)")
    parser.add_argument("--version", action="version", version=f"cytonet {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        # Build only the chosen command's options, so `cytonet mask` never imports the training modules.
        if name == command:
            importlib.import_module(module_name).configure_parser(sub_parser)
    return parser


_LOG_FLAG = re.compile(r"-[vq]+|--verbose|--quiet")


def _command_of(argv: list[str]) -> str | None:
    """The sub-command named in argv, after any leading -v/-q flags."""
    return next((a for a in argv if not _LOG_FLAG.fullmatch(a)), None)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cytonet`` command."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_of(argv)).parse_args(argv)
    setup_logging(args.log_verbose - args.log_quiet)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
