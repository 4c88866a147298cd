"""``manifest``: manifest tools (``manifest convert``: published prompt sets into checked manifests)."""

from __future__ import annotations

import argparse

from . import _common as common

__all__ = ["cmd_manifest_convert", "add_manifest"]


def cmd_manifest_convert(args: argparse.Namespace) -> None:
    from diffmem.data import SplitConfig, convert_manifest

    split = SplitConfig(seed=args.split_seed, locate_fraction=args.locate_fraction)
    summary = convert_manifest(args.source, args.out, memorized=args.memorized, split=split,
                               allow_outside=args.allow_outside_references)
    print(summary.text)  # noqa: T201 - the command's output


def add_manifest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifest", help="manifest tools: convert published prompt sets into checked manifests")
    manifest = p.add_subparsers(dest="manifest_command", metavar="COMMAND", required=True, parser_class=common.Parser)
    p = common.add_command(manifest, "convert", cmd_manifest_convert,
                           "write a checked manifest from a published prompt set or a prompt list")
    p.add_argument("source", metavar="IN",
                   help="Wen jsonl, NeMo csv, Webster parquet, MemBench csv, diffmem manifest or prompt list")
    p.add_argument("out", metavar="OUT", help="the manifest to write (.jsonl)")
    label = p.add_mutually_exclusive_group()
    label.add_argument("--memorized", action="store_const", const=True, default=None,
                       help="every row of a file without labels (prompt list, Wen jsonl, NeMo csv) is memorized")
    label.add_argument("--not-memorized", dest="memorized", action="store_const", const=False,
                       help="no row of a file without labels is memorized")
    p.add_argument("--split-seed", type=common.nonneg_int, default=0, metavar="N",
                   help="seed of the hash that splits memorized rows between locate and heldout (default 0)")
    p.add_argument("--locate-fraction", type=common.rate, default=0.5, metavar="F",
                   help="share of the memorized prompts that go to locate; the rest go to heldout (default 0.5)")
    p.add_argument("--allow-outside-references", action="store_true",
                   help="accept reference paths outside the input's or the output's folder")
