"""`python -m trainer export --checkpoint runs/pretrained/best.pt --out models/burst-deblur.pt`

Writes the part of a training checkpoint that inference needs: the weights, the resolved config,
the step and validation results, and the software versions. No optimizer state (a third of a
training checkpoint's size or more), so a shipped model stays small. The result loads with
``trainer.model.load`` (``trainer.checkpoint.load_checkpoint``, weights_only=True, inside) like any checkpoint, and is
written atomically: an existing --out is replaced only by a complete file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.version import add_version


def export(checkpoint: str | Path, out: str | Path) -> dict:
    """Export ``checkpoint`` to ``out``; returns what was written (without the weights)."""
    from trainer.checkpoint import load_checkpoint, save_atomic, software_versions
    from trainer.model import load

    checkpoint, out = Path(checkpoint), Path(out)
    load(checkpoint)  # validates it (one-line ValueError if it is not a burst-deblur checkpoint)
    ckpt = load_checkpoint(checkpoint)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    info = {
        "config": ckpt["config"],
        "step": int(ckpt.get("step", 0)),
        "best_val_psnr": float(ckpt.get("best_val_psnr", float("nan"))),
        "val": ckpt.get("val", {}),
        "versions": software_versions(),
        "source": checkpoint.name,
    }
    save_atomic({"model": ckpt["model"], **info}, out)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer export",
                                description="Write the inference part of a checkpoint (weights + config, no optimizer).")
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by `python -m trainer train`")
    p.add_argument("--out", required=True, help="the exported model file (e.g. models/burst-deblur.pt)")
    add_version(p)
    args = p.parse_args(argv)
    info = export(args.checkpoint, args.out)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB, step {info['step']}, best val PSNR {info['best_val_psnr']:.2f} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
