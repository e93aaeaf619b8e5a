"""Deblur a user's burst of photos: load, align to a reference frame, run the model in tiles.

    python -m trainer deblur --checkpoint runs/default/best.pt IMG_1.jpg IMG_2.jpg ... --out sharp.png

Pipeline (every step a plain function that tests call):
1. ``load_frames``: the project's photo reader, RGB uint8 (H, W, 3) sRGB; all the same size.
2. ``trainer.align.align_burst``: choose the reference (by default the sharpest frame, so the
   order of the files does not matter), estimate a homography per frame, resample every frame
   onto the reference grid. A frame no motion model aligns (homography, then affine, then
   translation) is left out with a warning on stderr, as long as 2 usable frames remain.
3. ``trainer.tiling.run_tiled``: the model on overlapping tiles whose blended output equals one
   untiled pass up to float rounding.
4. ``save_image``: written atomically (temporary file + rename), 8-bit, format from the extension;
   beside it ``<out>.align.json`` (``write_report``: per frame the transform, the motion model,
   residual, ZNCC, reference, used or rejected and why); with ``--save-aligned DIR`` the aligned
   frames as PNG.

``prepare_frames`` is step 2 and ``deblur_aligned`` step 3; ``deblur_frames`` is both on loaded
frames, steered by a ``DeblurOptions``; ``main`` is the command line: it checks every argument,
``--out`` and ``--save-aligned`` before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from common.errors import UserError
from common.files import atomic_path, atomic_write_bytes
from common.version import add_version
from trainer.align import align_burst, alignment_level, report
from trainer.device import resolve_device
from trainer.tiling import auto_overlap, run_tiled, tile_starts


class DeblurInputError(UserError):
    """A frame, an option or the output path the user gave cannot be used; the message is one line."""


# ----------------------------------------------------------------------------- frames


# Frames smaller than this on their short side are refused: alignment and the network need room.
MIN_FRAME_SIDE = 32


def load_frames(paths: Sequence[str | Path], log=None) -> list[np.ndarray]:
    """Read photos as RGB uint8 (H, W, 3) sRGB with the project's one photo reader
    (pipeline.sources.load_photo: EXIF orientation applied, grey to RGB, alpha dropped, 16-bit
    reduced to 8 bits, Pillow's decompression-bomb limit kept); all must be one size.

    Raises FileNotFoundError for a missing file, DeblurInputError for an unreadable one or frames
    of different sizes (each message names the file). ``log`` gets one note per high-bit-depth file.
    """
    from pipeline.sources import PhotoDecodeError, load_photo_depth

    if not paths:
        raise DeblurInputError("no frames given")
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"frame not found: {path}")
        try:
            frame, bits = load_photo_depth(str(path))
        except PhotoDecodeError as e:
            raise DeblurInputError(f"cannot read image {path}: {e.reason} ({e.detail})") from None
        except OSError as e:
            raise DeblurInputError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
        if bits > 8 and log:
            log(f"note: {path.name} has {bits}-bit samples: reduced to 8 bits (the model works on 8-bit frames)")
        frames.append(frame)
        if frames[-1].shape != frames[0].shape:
            h0, w0 = frames[0].shape[:2]
            h, w = frames[-1].shape[:2]
            raise DeblurInputError(f"{path} is {w}x{h} but {Path(paths[0])} is {w0}x{h0}; "
                                   "all frames must have the same size")
    return frames


def check_frame_size(shape: tuple[int, ...], path: str | Path, align: bool, align_size: int) -> None:
    """DeblurInputError (one line naming the file) for frames too small to align and deblur: the
    short side under MIN_FRAME_SIDE, or, when aligning, under 16 px once the long side is brought
    down to ``align_size`` (a 16 x 20000 strip)."""
    h, w = shape[:2]
    if min(h, w) < MIN_FRAME_SIDE:
        raise DeblurInputError(f"{path} is {w}x{h}: frames must be at least {MIN_FRAME_SIDE} px on each side")
    if align:
        short = min(h, w) / 2 ** alignment_level((h, w), align_size)
        if short < 16:
            raise DeblurInputError(f"{path} is {w}x{h}: too elongated to align at --align-size {align_size} (the short "
                                   f"side would be {short:.0f} px, needs 16); raise --align-size or use --no-align")


# ----------------------------------------------------------------------------- deblurring


@dataclasses.dataclass(frozen=True)
class DeblurOptions:
    """How ``deblur_frames`` aligns and tiles; the defaults are the command line's.

    reference: the frame the others are aligned to and the output's geometry: an index into the
        frames, or "auto" (the sharpest, independent of order).
    align: False when the frames are already registered. motion: "homography" or "translation",
        the richest model tried (a homography that fails falls back to affine, then translation).
    align_size: the long side (px) of the downscaled copy alignment works on (>= 64).
    tile: tile side in px (>= 16). overlap: px, or None for ``auto_overlap`` of the model (tiling
        then invisible). batch: tiles per forward pass, or None for 2 on CUDA, 1 on CPU (halved
        automatically on out-of-memory). precision: "fp32" or "bf16" (autocast).
    Invalid values raise DeblurInputError naming the command-line flag.
    """

    reference: int | str = "auto"
    align: bool = True
    motion: str = "homography"
    align_size: int = 1024
    tile: int = 512
    overlap: int | None = None
    batch: int | None = None
    precision: str = "fp32"

    def __post_init__(self):
        if self.reference != "auto" and not isinstance(self.reference, (int, np.integer)):
            raise DeblurInputError(f"--reference must be 'auto' or a frame index, got '{self.reference}'")
        if self.motion not in ("homography", "translation"):
            raise DeblurInputError(f"--motion must be 'homography' or 'translation', got '{self.motion}'")
        if self.align_size < 64:
            raise DeblurInputError(f"--align-size must be >= 64, got {self.align_size}")
        if self.tile < 16:
            raise DeblurInputError(f"--tile must be >= 16, got {self.tile}")
        if self.overlap is not None and self.overlap < 0:
            raise DeblurInputError(f"--overlap must be >= 0, got {self.overlap}")
        if self.batch is not None and self.batch < 1:
            raise DeblurInputError(f"--batch must be >= 1 (or 0 for the default), got {self.batch}")
        if self.precision not in ("fp32", "bf16"):
            raise DeblurInputError(f"--precision must be 'fp32' or 'bf16', got '{self.precision}'")


def prepare_frames(frames: Sequence[np.ndarray], options: DeblurOptions = DeblurOptions(),
                   names: Sequence[str] | None = None, log=None) -> tuple[list[np.ndarray], dict]:
    """Align (unless ``options.align`` is False or there is one frame), leave out the frames that
    cannot be aligned, and put the reference first, as the model takes it (the output's geometry;
    the others' order is free).

    frames: RGB uint8 (H, W, 3) sRGB, same size. names: one per frame, for messages (default #i).
    Returns (the frames for the model, uint8 (H, W, 3) each; the alignment report,
    ``trainer.align.report``: per frame its transform, model, residual, ZNCC, used or rejected
    and why). A burst left with fewer than 2 usable frames raises AlignmentError (a single frame
    given alone is deblurred as a burst of one).
    """
    names = list(names) if names is not None else [f"#{i}" for i in range(len(frames))]
    if options.reference != "auto" and not -len(frames) <= options.reference < len(frames):
        raise DeblurInputError(f"--reference {options.reference} is out of range for {len(frames)} frames")
    if options.align and len(frames) > 1:
        frames, ref, alignments = align_burst(frames, options.reference, options.motion, options.align_size,
                                              names=names, log=log)
    else:
        ref = 0 if options.reference == "auto" else options.reference % len(frames)
        alignments = [None] * len(frames)
    used = [frames[ref]] + [f for i, f in enumerate(frames) if i != ref and f is not None]
    return used, report(names, ref, alignments)


def deblur_aligned(model: torch.nn.Module, frames: Sequence[np.ndarray], options: DeblurOptions = DeblurOptions(),
                   device: str | torch.device = "cpu", progress: bool = False, log=None) -> np.ndarray:
    """run_tiled on frames from ``prepare_frames`` (the reference first). progress: a tile
    progress bar; log: a line before the tiled run. Returns float32 (H, W, 3) sRGB in [0, 1]."""
    device = torch.device(device)
    # one 512-px tile of 8 frames through the paper-size model takes ~6 GB in fp32 (measured on CPU)
    batch = options.batch or (2 if device.type == "cuda" else 1)
    overlap = options.overlap
    if log:
        cfg = getattr(model, "cfg", None)
        if overlap is None and cfg is not None:
            overlap = auto_overlap(cfg)  # what run_tiled would derive (measured once, cached)
        (rows, cols), multiple = frames[0].shape[:2], getattr(cfg, "multiple", 1)
        tiles = (len(tile_starts(rows, options.tile, overlap, multiple))
                 * len(tile_starts(cols, options.tile, overlap, multiple))) if overlap is not None else "?"
        guided = getattr(cfg, "uses_fba", False)
        log(f"deblurring {cols}x{rows} px, {len(frames)} frames: "
            f"{'the FBA of the whole burst, then ' if guided else ''}{tiles} tile(s) of up to "
            f"{options.tile} px (overlap {overlap} px), {batch} per pass on {device} ...")
    return run_tiled(model, frames, options.tile, overlap, device, batch, options.precision, progress)


def deblur_frames(model: torch.nn.Module, frames: Sequence[np.ndarray], options: DeblurOptions = DeblurOptions(),
                  device: str | torch.device = "cpu", names: Sequence[str] | None = None,
                  progress: bool = False, log=None) -> np.ndarray:
    """The whole user path on loaded frames: ``prepare_frames`` (align, reject, reference first),
    then ``deblur_aligned``. Arguments as theirs; returns float32 (H, W, 3) sRGB in [0, 1], in
    the reference frame's geometry."""
    used, _ = prepare_frames(frames, options, names, log)
    return deblur_aligned(model, used, options, device, progress, log)


def report_path(out: Path) -> Path:
    """The alignment report beside the output: ``<out>.align.json``."""
    return out.with_name(out.name + ".align.json")


def aligned_paths(folder: Path, names: Sequence[str]) -> list[Path]:
    """Where ``--save-aligned`` writes frame i (the i-th FRAME given): ``NN-<stem>.aligned.png``."""
    return [folder / f"{i:02d}-{Path(name).stem}.aligned.png" for i, name in enumerate(names)]


def write_report(summary: dict, path: Path) -> None:
    """The alignment report as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(summary, indent=1) + "\n").encode())


def check_output(out: Path, inputs: Sequence[str | Path]) -> None:
    """Before any work: ``out`` has a known image extension, is not a folder, lies in an existing
    writable folder and is none of the input frames (the output would overwrite it)."""
    if Image.registered_extensions().get(out.suffix.lower()) is None:
        raise DeblurInputError(f"--out {out}: unknown image extension '{out.suffix}' (use .png, .jpg, .tif, ...)")
    if out.is_dir():
        raise DeblurInputError(f"--out {out} is a folder; give an image file name")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: folder {folder} is not writable")
    for path, flag in ((out, "--out"), (report_path(out), "the alignment report")):
        _never_an_input(path, inputs, flag)


def check_save_aligned(folder: Path, inputs: Sequence[str | Path]) -> None:
    """Before any work: ``--save-aligned`` is a folder (made if missing, its parent existing) and
    none of the files it would get is an input frame."""
    if folder.exists() and not folder.is_dir():
        raise DeblurInputError(f"--save-aligned {folder} is a file; give a folder")
    parent = folder.parent if str(folder.parent) else Path(".")
    if not folder.exists() and not parent.is_dir():
        raise FileNotFoundError(f"--save-aligned {folder}: folder {parent} does not exist")
    for path in aligned_paths(folder, [Path(f).name for f in inputs]):
        _never_an_input(path, inputs, "--save-aligned")


def _never_an_input(path: Path, inputs: Sequence[str | Path], flag: str) -> None:
    target = path.resolve()
    for frame in map(Path, inputs):
        if frame.resolve() == target or (path.exists() and frame.exists() and os.path.samefile(frame, path)):
            raise DeblurInputError(f"{flag} {path} is one of the input frames ({frame}); it would be overwritten")


def save_image(image: np.ndarray, path: str | Path) -> None:
    """Write float (H, W, 3) in [0, 1] as 8-bit, format from the extension, atomically."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise DeblurInputError(f"--out {path}: unknown image extension '{path.suffix}' (use .png, .jpg, .tif, ...)")
    if not path.parent.exists():
        raise FileNotFoundError(f"--out {path}: folder {path.parent} does not exist")
    pixels = np.clip(np.rint(np.asarray(image, np.float64) * 255), 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        # PNG at zlib level 1: the same pixels, 5x faster to write than Pillow's default level 6
        # for a 12 MP image (1.1 s against 5.7 s, ~18% larger; docs/benchmarks.md)
        kwargs = {"JPEG": {"quality": 95}, "PNG": {"compress_level": 1}}.get(fmt, {})
        Image.fromarray(pixels, "RGB").save(tmp, format=fmt, **kwargs)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer deblur",
        description="Deblur a burst of handheld photos with a trained checkpoint: align the frames "
                    "to a reference, run the model in overlapping tiles, write one sharp image.")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint written by `python -m trainer train` (default: the shipped model, "
                        "models/burst-deblur.pt)")
    p.add_argument("frames", nargs="+", metavar="FRAME", help="the burst's photos (any order, same size)")
    p.add_argument("--out", required=True, help="output image; the format follows the extension (.png: 8-bit)")
    p.add_argument("--reference", default="auto",
                   help="frame the others are aligned to: 'auto' = the sharpest (order independent), "
                        "or an index into the FRAME list (default: auto)")
    p.add_argument("--tile", type=int, default=512, help="tile side in px (default: 512)")
    p.add_argument("--overlap", default="auto",
                   help="tile overlap in px; 'auto' = enough to cover the model's receptive field, which "
                        "makes tiling invisible (96 px for the default model) (default: auto)")
    p.add_argument("--batch", type=int, default=0,
                   help="tiles per forward pass; halved automatically when the GPU runs out of memory "
                        "(default: 2 on CUDA, 1 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (faster on recent GPUs) (default: fp32)")
    p.add_argument("--motion", choices=("homography", "translation"), default="homography",
                   help="global motion model for alignment (default: homography)")
    p.add_argument("--align-size", type=int, default=1024,
                   help="alignment runs on a downscaled copy whose long side is at most this (default: 1024)")
    p.add_argument("--no-align", action="store_true", help="the frames are already aligned: skip alignment")
    p.add_argument("--save-aligned", metavar="DIR", default=None,
                   help="also save the frames the model sees, aligned to the reference, as DIR/NN-<name>.aligned.png "
                        "(NN: the frame's position in the FRAME list; rejected frames are not saved)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, per-frame report or step notes")
    add_version(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainer.model import default_checkpoint, load

    overlap = _int_or_auto(args.overlap, "--overlap", "a number of px")
    options = DeblurOptions(reference=_int_or_auto(args.reference, "--reference", "a frame index"),
                            align=not args.no_align, motion=args.motion, align_size=args.align_size,
                            tile=args.tile, overlap=None if overlap == "auto" else overlap,
                            batch=args.batch or None, precision=args.precision)
    out = Path(args.out)
    check_output(out, args.frames)  # before any work: never over an input, folder writable
    save_aligned = Path(args.save_aligned) if args.save_aligned else None
    if save_aligned:
        check_save_aligned(save_aligned, args.frames)
    device = resolve_device(args.device)

    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    checkpoint = default_checkpoint(args.checkpoint)
    if log:
        log(f"loading {checkpoint} on {device} and reading {len(args.frames)} frames ...")
    model = load(checkpoint, device)
    frames = load_frames(args.frames, log=log)
    check_frame_size(frames[0].shape, args.frames[0], options.align and len(frames) > 1, options.align_size)
    names = [Path(f).name for f in args.frames]
    used, summary = prepare_frames(frames, options, names, log=log)
    for entry in summary["frames"]:  # on stderr even with --quiet: the output has fewer frames than given
        if entry["status"] == "rejected":
            print(f"warning: frame {entry['name']} rejected: {entry['reason']}", file=sys.stderr)
    if save_aligned:
        save_aligned.mkdir(exist_ok=True)
        order = sorted((e for e in summary["frames"] if e["status"] == "used"), key=lambda e: not e["reference"])
        paths = aligned_paths(save_aligned, names)
        for entry, frame in zip(order, used):  # used: the reference first, then the others in order
            save_image(frame / 255.0, paths[entry["index"]])
    image = deblur_aligned(model, used, options, device, progress=not args.quiet, log=log)
    save_image(image, out)
    write_report(summary, report_path(out))
    h, w = image.shape[:2]
    rejected = f", {summary['rejected']} rejected" if summary["rejected"] else ""
    print(f"wrote {out} ({w}x{h}, {len(used)} frames{rejected}) and {report_path(out).name}")
    return 0


def _int_or_auto(text: str, flag: str, what: str) -> int | str:
    """A flag's value: "auto", or an int (DeblurInputError naming the flag otherwise)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise DeblurInputError(f"{flag} must be 'auto' or {what}, got '{text}'") from None


if __name__ == "__main__":
    sys.exit(main())
