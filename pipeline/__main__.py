"""Command line: python -m pipeline {render, inspect, verify} ... (a thin layer over plain functions)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from common.errors import run_cli
from common.version import add_version


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C: the process pool or Ray
    stops and the folder's lock is released (the default action would kill the driver on the spot)."""

    exit_code = 143


def _raise_terminated(signum, frame):
    _sigterm.set()
    raise Terminated()


_sigterm = threading.Event()  # a SIGTERM arrived: what it raised may come back as a plain KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline",
                                     description="Render and inspect burst/target shards.")
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="render (or resume) a dataset of shards",
                       description="Render the dataset of a shard config into tar shards + kernels.zarr.")
    p.add_argument("--config", required=True,
                   help="shard config TOML, e.g. configs/shards/default.toml; a path that is not a file "
                        "here names a bundled config (configs/shards/default.toml, or just 'default')")
    p.add_argument("--out", help="output folder (default: shards/<dataset.name>, under the current directory)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel shard writers (default 2); with --address, the most shards in flight "
                        "(default: one per CPU of the cluster)")
    p.add_argument("--engine", choices=("ray", "local"), default="ray",
                   help="ray (default) or local (a process pool; identical bytes)")
    p.add_argument("--address", help="join an existing Ray cluster (auto on one of its nodes, or host:port "
                                     "of its head, e.g. 10.0.0.1:6379); --out must be a path every node sees")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset rendered with another config")
    p.add_argument("--retries", type=int, default=2, help="retries of a failed shard (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set splits.train.samples=100 (repeatable)")
    p.add_argument("--max-worker-gb", type=float, default=8.0, metavar="GB",
                   help="refuse, before any work, a config whose estimated memory per worker is "
                        "over this (default 8; 0 = no limit)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_version(p)

    p = sub.add_parser("inspect", help="summary of a dataset, or a contact sheet of one sample",
                       description="Without --sheet/--index/--key: print a summary. With them: write a contact "
                                   "sheet PNG (--sheet alone: the sample of median blur in the split's first shard).")
    p.add_argument("dir", help="dataset folder (with manifest.json), or its URL "
                               "(http(s)://, or s3://, gs://, ... with fsspec)")
    p.add_argument("--split", help="split of --sheet/--index (default: the first split)")
    p.add_argument("--sheet", action="store_true",
                   help="write a contact sheet of a sample of typical blur (the median of the split's first "
                        "shard); --index or --key choose another sample")
    p.add_argument("--index", type=int, help="sample index within the split (implies --sheet)")
    p.add_argument("--key", help="sample key, e.g. test-000000-000003 (implies --sheet)")
    p.add_argument("--out", help="contact sheet PNG (default: <dir>/<key>.png)")
    add_version(p)

    p = sub.add_parser("verify", help="check every shard against the manifest",
                       description="Check sha256, sizes, sample counts and members of every shard, the "
                                   "checksums of every kernels.zarr file, and report files that are not "
                                   "part of the dataset (temporary files and unlisted tars are errors, "
                                   "exit 1; other files are warnings).")
    p.add_argument("dir", help="local dataset folder (with manifest.json); URLs are not verified")
    add_version(p)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def run() -> int:
        if args.command == "render":
            from pathlib import Path

            from common.bundled import find_config
            from pipeline.config import load_shard_config
            from pipeline.run import render_dataset

            cfg = load_shard_config(find_config(args.config, "shards"), args.overrides)
            out = Path(args.out) if args.out else Path("shards") / cfg.dataset.name
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
            try:
                workers = args.workers if args.workers is not None else None if args.address else 2
                manifest = render_dataset(cfg, out, workers=workers, engine=args.engine,
                                          address=args.address, overwrite=args.overwrite,
                                          retries=args.retries, progress=not args.quiet,
                                          max_worker_gb=args.max_worker_gb or None)
            except KeyboardInterrupt as e:
                # Ray's ray.wait/ray.get catch what a signal handler raises and raise a plain
                # KeyboardInterrupt instead: still SIGTERM's exit status (143), not Ctrl-C's
                if _sigterm.is_set() and not isinstance(e, Terminated):
                    raise Terminated() from None
                raise
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
            n = sum(s["samples"] for s in manifest["splits"].values())
            print(f"{out}: {n} samples in {sum(len(s['shards']) for s in manifest['splits'].values())} "
                  f"shards, config {manifest['config_hash']}")
            return 0
        from pipeline import inspect as insp

        if args.command == "inspect":
            if not args.sheet and args.index is None and args.key is None:
                print(insp.summary(args.dir))
                return 0
            path = insp.contact_sheet(args.dir, split=args.split, index=args.index, key=args.key, out=args.out)
            print(f"wrote {path}")
            return 0
        report = insp.check_dataset(args.dir)  # one line per problem: errors exit 1, warnings do not
        for line in report.errors:
            print(f"error: {line}", file=sys.stderr)
        for line in report.warnings:
            print(f"warning: {line}", file=sys.stderr)
        if report.errors:
            return 1
        checked = " and every kernels.zarr file" if report.kernels_checked else ""
        print(f"{args.dir}: every shard{checked} matches the manifest")
        return 0

    return run_cli(run, interrupted="interrupted: finished shards are kept; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
