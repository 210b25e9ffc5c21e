"""The ``cytonet`` command line: one sub-command per pipeline stage.

Each sub-command lives in its stage module, which defines ``configure_parser(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so light commands (masking, patches) never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("cytonet.io.config", "validate a config file and its brain/section/area tables"),
    "make-demo": ("cytonet.synth.cli", "generate the demo brains (or one brain, or a benchmark section)"),
    "mask": ("cytonet.preprocess.mask", "compute the tissue mask of an image or a section"),
    "patches": ("cytonet.preprocess.patches", "sample and extract patches of one brain into a Zarr store"),
    "pretrain": ("cytonet.learn.pretrain", "SpatialNCE pretraining of an encoder on patch stores (torchrun/srun/single)"),
    "finetune": ("cytonet.learn.finetune", "train an area classifier on the labelled patches of the known brains"),
    "evaluate": ("cytonet.analysis.evaluate", "classification metrics of the models on known and unknown brains"),
    "infer": ("cytonet.mapping.infer", "map a whole section: probability, area and entropy maps"),
    "smooth3d": ("cytonet.mapping.smooth3d", "make the area maps of neighbouring sections consistent in 3D"),
    "section-metrics": ("cytonet.analysis.section_metrics", "pixel-level per-area F1/IoU of one section's area map"),
    "embed": ("cytonet.analysis.embed", "UMAP of the pretrained features, area clusters and FA-PB separation"),
    "aggregate": ("cytonet.analysis.aggregate", "per-brain and overall metric tables, maps index and montages"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser; only ``command``'s own options are built (its module is imported)."""
    parser = argparse.ArgumentParser(prog="cytonet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        # Build only the chosen command's options, so `cytonet mask` never imports the training modules.
        if name == command:
            importlib.import_module(module_name).configure_parser(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cytonet`` command."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


def stage_main(module: str, argv: list[str] | None = None) -> int:
    """Run the command of one stage module, as ``python -m cytonet.<module>`` does (e.g. under torchrun)."""
    command = next(name for name, (module_name, _) in COMMANDS.items() if module_name == module)
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
