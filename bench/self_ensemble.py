"""Test-time self-ensemble: does averaging the model over flips and rotations of the burst help?

    .venv/bin/python bench/self_ensemble.py --data shards/quality-aligned --transforms 1,2,8

Each burst (all its frames alike) is rotated by 0-3 quarter turns and/or mirrored, the model runs on
each of the first T of those 8 transforms, the outputs are turned back and averaged; then scored by
`trainer.evaluate` against FBA as usual (the same bursts, frames and targets for every T; T = 1 is the
plain model). The dataset is one of `bench/quality.py`'s renderings (run it first: it renders
`shards/quality-<variant>`). Costs T times the model's time. Results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trainer.evaluate as evaluate  # noqa: E402

DIHEDRAL = [(turns, mirror) for mirror in (False, True) for turns in range(4)]


def ensembled(transforms: int):
    """A replacement for evaluate.run_model averaging over the first ``transforms`` of DIHEDRAL."""

    @torch.no_grad()
    def run_model(model, bursts, device):
        x = evaluate.burst_to_input(torch.from_numpy(bursts), device)  # (B, N, 3, H, W)
        total = 0
        for turns, mirror in DIHEDRAL[:transforms]:
            y = torch.rot90(x.flip(-1) if mirror else x, turns, (-2, -1)).contiguous()
            out = torch.rot90(model(y).float(), -turns, (-2, -1))
            total = total + (out.flip(-1) if mirror else out)
        out = (total / transforms).clamp_(0, 1)
        return out.permute(0, 2, 3, 1).double().cpu().numpy()

    return run_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="default: the shipped model")
    ap.add_argument("--data", required=True, help="a rendered dataset with a test split")
    ap.add_argument("--transforms", default="1,2,8", help="how many of the 8 transforms to average (1-8)")
    ap.add_argument("--frames", default="1,4,8")
    args = ap.parse_args()
    from trainer.model import default_checkpoint

    counts = [int(t) for t in args.transforms.split(",")]
    if any(not 1 <= t <= len(DIHEDRAL) for t in counts):
        ap.error(f"--transforms: each must be 1..{len(DIHEDRAL)}, got {args.transforms}")
    frames = [int(n) for n in args.frames.split(",")]
    checkpoint = default_checkpoint(args.checkpoint)
    print(f"{'T':>3} {'N':>3} {'model':>7} {'FBA':>7}  model - FBA (paired, 95%)")
    for t in counts:
        evaluate.run_model = ensembled(t)
        with tempfile.TemporaryDirectory() as out:
            s = evaluate.evaluate(checkpoint, args.data, "test", out, frames=frames, device="cpu",
                                  progress=False, examples=0)
        for n in map(str, frames):
            d = s["differences"]["model-fba"][n]["psnr"]
            print(f"{t:>3} {n:>3} {s['methods']['model'][n]['psnr']['mean']:7.2f} {s['methods']['fba'][n]['psnr']['mean']:7.2f}"
                  f"  {d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
