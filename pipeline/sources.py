"""Where sharp images come from: a folder of photos, bundled photographs, or dead leaves.

A split's ``source`` string names one of three kinds of sharp image:

- ``"dir:/path"``: every decodable photo under a folder (recursive). ``list_source`` scans it once
  with header reads only (format, size, mode; no pixel decode) and counts what it skips and why.
- ``"samples"`` / ``"samples:<set>"``: real photographs bundled inside installed packages
  (scikit-image's data folder, matplotlib's sample data, scikit-learn's sample images), so a
  pipeline runs with no download at all. The photos come in disjoint sets (``SAMPLE_SETS``), so
  a validation split and a test split never share a photograph; ``"samples"`` is ``"samples:test"``,
  and ``"samples:train"`` holds a few more for training.
- ``"mix:W1*SPEC1|W2*SPEC2|..."``: each canvas drawn from one of the component sources with
  probability proportional to its weight, e.g. ``"mix:0.7*deadleaves|0.3*dir:/data/photos"`` for
  users who bring photographs (the component is drawn from the same generator first).
- ``"deadleaves"``: procedural images of occluding disks with power-law radii (the dead-leaves
  model of Lee, Mumford & Huang; used as training data for restoration nets by Achddou et al.
  and Baradad et al.). They have edges at every scale, need no files and cost ~2.3 ms each.

``draw_canvas(rng, source, canvas, cfg)`` turns one of these into a sharp square canvas, uint8
(canvas, canvas, 3) sRGB, plus a plain dict of everything it drew (the sample's provenance).
All randomness comes from the numpy Generator passed in: the same generator state and the same
files give the same bytes, in any process, in any order of calls.
"""

from __future__ import annotations

import bisect
import collections
import importlib.util
import os
import stat
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import UserError, flat
from pipeline.imaging import standard_noise

# Reasons a file is skipped at scan time (keys of SourceList.skipped), in report order.
SKIP_REASONS = ("not an image", "unreadable", "too small", "decompression bomb", "unsupported mode")

# The bundled photographs, in disjoint sets: set name -> ((package, path inside the package), ...).
# "test" is what `make eval` scores; "val" picks best.pt. No photograph (nor another view of the
# same scene: motorcycle_right is left out) is in two sets. Desktop wallpapers are never used here:
# they are reserved for independent evaluation.
SAMPLE_SETS = {
    "test": (
        ("skimage", "data/astronaut.png"),
        ("skimage", "data/chelsea.png"),
        ("skimage", "data/coffee.png"),
        ("skimage", "data/rocket.jpg"),
        ("skimage", "data/motorcycle_left.png"),
        ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ),
    "val": (
        ("sklearn", "datasets/images/china.jpg"),
        ("sklearn", "datasets/images/flower.jpg"),
        ("skimage", "data/camera.png"),  # grayscale photographs: real textures and edges
        ("skimage", "data/brick.png"),
        ("skimage", "data/grass.png"),
        ("skimage", "data/gravel.png"),
    ),
    # Photographs for training (a "mix:" with dead leaves): camera images of other subjects than
    # the val and test sets' (coins, the moon, a Hubble field, a retina, two microscope slides).
    "train": (
        ("skimage", "data/coins.png"),
        ("skimage", "data/moon.png"),
        ("skimage", "data/hubble_deep_field.jpg"),
        ("skimage", "data/retina.jpg"),
        ("skimage", "data/ihc.png"),
        ("skimage", "data/cell.png"),
    ),
}
SAMPLE_FILES = SAMPLE_SETS["test"]  # what plain "samples" means


def sample_set(spec: str) -> str | None:
    """The set name of a "samples" / "samples:<set>" spec, or None if ``spec`` is not one."""
    if spec == "samples":
        return "test"
    if spec.startswith("samples:"):
        return spec[len("samples:"):]
    return None

# Pillow modes load_photo converts to 8-bit RGB (anything else is skipped as "unsupported mode").
_GRAY16 = ("I;16", "I;16L", "I;16B", "I;16N")
_SUPPORTED_MODES = frozenset(("1", "L", "P", "PA", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX",
                              "CMYK", "YCbCr", "LAB", "HSV", "I", "F") + _GRAY16)

MAX_DRAW_TRIES = 20  # photos tried per canvas before giving up (each one a different file)
# Header reads of a big folder run in threads, in chunks: on a cold or network disk most of the
# time is spent waiting for reads; on a warm page cache (~22 us per file) they cost nothing extra.
_SCAN_THREADS = 8
_SCAN_CHUNK = 512  # files per thread task


class SourceError(UserError):
    """A source that cannot be used; the message is one line naming the problem."""


class PhotoDecodeError(UserError):
    """A listed photo whose full decode failed (truncated, corrupt, ...)."""

    def __init__(self, path: str, reason: str, detail: str):
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"{path}: {reason} ({detail})")


@dataclass(frozen=True)
class SourceList:
    """A scanned source: what ``draw_canvas`` draws from, and what the scan skipped.

    kind: "deadleaves", "photos" or "mix". paths: usable photo files, absolute, sorted (empty for
    dead leaves and mixes). skipped: reason (one of SKIP_REASONS) -> sorted paths skipped at scan
    time (a mix: its components' together). parts: a mix's (weight, SourceList) components.
    """

    spec: str
    kind: str
    root: str
    paths: tuple[str, ...]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    parts: tuple = ()

    def name(self, path: str) -> str:
        """How a photo is named in sample metadata: relative to the folder, or its file name."""
        return os.path.relpath(path, self.root) if self.root else os.path.basename(path)


# ----------------------------------------------------------------------------- listing


def list_source(spec: str, min_side: int) -> SourceList:
    """Scan the source named by ``spec`` ("deadleaves" | "samples[:set]" | "dir:/path").

    Photos whose shorter side is below ``min_side`` px are skipped as "too small". Raises
    SourceError when the folder is missing, is a file, is empty, or holds no usable photo.
    """
    if spec == "deadleaves":
        return SourceList(spec=spec, kind="deadleaves", root="", paths=())
    if spec.startswith("mix:"):
        parts = []
        for item in parse_mix(spec):
            parts.append((item[0], list_source(item[1], min_side)))
        skipped: dict[str, list[str]] = {}
        for _, part in parts:
            for reason, files in part.skipped.items():
                skipped.setdefault(reason, []).extend(files)
        return SourceList(spec=spec, kind="mix", root="", paths=(), skipped=_ordered(skipped), parts=tuple(parts))
    if sample_set(spec) is not None:
        name = sample_set(spec)
        if name not in SAMPLE_SETS:
            raise SourceError(f"unknown bundled photo set '{name}' in '{spec}' (sets: {', '.join(SAMPLE_SETS)})")
        files, missing = _sample_files(SAMPLE_SETS[name])
        paths, skipped = _probe_all(files, min_side)
        if missing:
            skipped.setdefault("unreadable", []).extend(missing)
            skipped["unreadable"].sort()
        if not paths:
            raise SourceError(f"no usable bundled sample photo ({_skip_summary(skipped, min_side)}); "
                              f"are scikit-image, matplotlib and scikit-learn installed?")
        return SourceList(spec=spec, kind="photos", root="", paths=tuple(paths), skipped=_ordered(skipped))
    if spec.startswith("dir:") and len(spec) > 4:
        root = os.path.abspath(os.path.expanduser(spec[4:]))
        if not os.path.exists(root):
            raise SourceError(f"source folder not found: {root}")
        if not os.path.isdir(root):
            raise SourceError(f"source path is a file, not a folder: {root}")
        files, unreadable = _walk_files(root)
        if not files and not unreadable:
            raise SourceError(f"source folder is empty (no files, recursively): {root}")
        paths, skipped = _probe_all(files, min_side)
        if unreadable:
            skipped["unreadable"] = sorted(skipped.get("unreadable", []) + unreadable)
        if not paths:
            raise SourceError(f"no usable image in {root} ({_skip_summary(skipped, min_side)})")
        _check_one_decodes(root, paths)
        return SourceList(spec=spec, kind="photos", root=root, paths=tuple(paths),
                          skipped=_ordered(skipped))
    raise SourceError(f"unknown source '{spec}' (expected 'deadleaves', 'samples[:set]' or 'dir:/path')")


def _check_one_decodes(root: str, paths: list[str]) -> None:
    """SourceError, before any work, when not one of ``paths`` decodes fully (a folder of only
    truncated JPEGs passes the header probe). Decodes in order until the first success, so a
    good folder costs one decode; the photos that fail later are counted by the workers."""
    failures: dict[str, int] = {}
    for path in paths:
        try:
            load_photo(path)
            return
        except PhotoDecodeError as e:
            failures[e.reason] = failures.get(e.reason, 0) + 1
        except OSError:
            failures["unreadable"] = failures.get("unreadable", 0) + 1
    what = ", ".join(f"{n} {reason}" for reason, n in failures.items())
    raise SourceError(f"no image in {root} decodes ({what}; first: {os.path.basename(paths[0])})")


def parse_mix(spec: str) -> list[tuple[float, str]]:
    """``"mix:W1*SPEC1|W2*SPEC2"`` -> [(W1, SPEC1), (W2, SPEC2)]; SourceError naming the problem.
    Weights are positive numbers (normalized when drawing); a component may not itself be a mix."""
    items = []
    for text in spec[len("mix:"):].split("|"):
        weight, sep, part = text.partition("*")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not part or not (w > 0 and w < float("inf")):
            raise SourceError(f"mix component '{text}' of '{spec}' is not WEIGHT*SOURCE with a positive weight")
        if part.startswith("mix:"):
            raise SourceError(f"mix component '{text}' of '{spec}' is itself a mix")
        items.append((w, part))
    return items


def _sample_files(files=SAMPLE_FILES) -> tuple[list[str], list[str]]:
    """(paths of the bundled sample photos that exist, paths of those that do not), in the order
    of ``files``: not sorted by absolute path, which would depend on where packages live."""
    found, missing = [], []
    for package, rel in files:
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        folders = spec.submodule_search_locations if spec else None
        path = os.path.join(folders[0], rel) if folders else f"<{package} not installed>/{rel}"
        (found if os.path.isfile(path) else missing).append(path)
    return found, missing


def _walk_files(root: str) -> tuple[list[str], list[str]]:
    """Every regular file under ``root``, following directory symlinks but entering each
    directory once (so a symlink loop ends), depth first in name order so that which of two
    links to one directory is used does not depend on the file system's listing order.

    Returns (files, unreadable), both sorted: unreadable holds dangling symlinks and folders
    that cannot be listed. Sockets, FIFOs and devices are ignored (opening a FIFO would block).
    """
    files, unreadable = [], []
    seen = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            unreadable.append(folder)
            continue
        subfolders = []
        for entry in entries:
            try:
                mode = entry.stat(follow_symlinks=True).st_mode
            except OSError:
                unreadable.append(entry.path)
                continue
            if stat.S_ISDIR(mode):
                subfolders.append(entry.path)
            elif stat.S_ISREG(mode):
                files.append(entry.path)
        stack.extend(reversed(subfolders))  # pop in name order
    files.sort()
    unreadable.sort()
    return files, unreadable


def probe(path: str, min_side: int) -> str | None:
    """Header check of one file: None if usable, else its skip reason (one of SKIP_REASONS).

    Reads the header only (Image.open is lazy). "not an image": no Pillow format recognizes it;
    "unreadable": an OSError while opening (no permission, I/O error, or a header that ends
    early). EXIF rotation swaps the sides, so the shorter side is the same before and after it.
    A file whose pixel data is truncated passes; draw_canvas records it when it fails to decode.
    """
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
    except Image.DecompressionBombError:
        return "decompression bomb"
    except UnidentifiedImageError:  # a subclass of OSError: test it first
        return "not an image"
    except OSError:
        return "unreadable"
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, zlib.error):
        return "not an image"  # a header that a Pillow plugin half-recognized, then choked on
    if mode not in _SUPPORTED_MODES:
        return "unsupported mode"
    if min(size) < min_side:
        return "too small"
    return None


def _probe_all(files: list[str], min_side: int) -> tuple[list[str], dict[str, list[str]]]:
    """Probe ``files`` (in order, threaded for big folders): (usable paths, skipped by reason)."""
    def probe_chunk(chunk: list[str]) -> list[str | None]:
        return [probe(f, min_side) for f in chunk]

    chunks = [files[i:i + _SCAN_CHUNK] for i in range(0, len(files), _SCAN_CHUNK)]
    if len(chunks) > 1:  # on a cold or network disk the reads overlap; map keeps the order
        with ThreadPoolExecutor(_SCAN_THREADS) as pool:
            reasons = [r for rs in pool.map(probe_chunk, chunks) for r in rs]
    else:
        reasons = probe_chunk(files)
    paths, skipped = [], {}
    for path, reason in zip(files, reasons):
        if reason is None:
            paths.append(path)
        else:
            skipped.setdefault(reason, []).append(path)
    return paths, skipped


def _ordered(skipped: dict[str, list[str]]) -> dict[str, list[str]]:
    return {r: skipped[r] for r in SKIP_REASONS if r in skipped}


def _skip_summary(skipped: dict[str, list[str]], min_side: int) -> str:
    n = sum(len(v) for v in skipped.values())
    parts = []
    for reason, files in _ordered(skipped).items():
        parts.append(f"{len(files)} {reason}" + (f" (< {min_side} px)" if reason == "too small" else ""))
    return f"{n} skipped: {', '.join(parts)}" if parts else "0 files"


# ----------------------------------------------------------------------------- decoding


def bit_depth(im: Image.Image) -> int:
    """Bits per channel of an opened (not necessarily loaded) image: 8, 16, 32 (int) or 32 (float).

    Pillow has no 16-bit colour mode: it opens a 16-bit RGB(A) PNG or TIFF as "RGB"/"RGBA" and
    keeps the top byte of each sample, which its raw mode (e.g. "RGB;16B") still tells."""
    if im.mode in _GRAY16:
        return 16
    if im.mode in ("I", "F"):
        return 32
    raw = im.tile[0][3] if getattr(im, "tile", None) else None
    raw = raw[0] if isinstance(raw, tuple) and raw else raw
    return 16 if isinstance(raw, str) and ";16" in raw else 8


def load_photo_depth(path: str) -> tuple[np.ndarray, int]:
    """load_photo, and the file's bits per channel (see bit_depth) before the reduction to 8."""
    with open(path, "rb") as f:  # a missing/unreadable file raises OSError here, not below
        try:
            with Image.open(f) as im:
                bits = bit_depth(im)
                im.load()
                im = ImageOps.exif_transpose(im)
        except Image.DecompressionBombError as e:
            raise PhotoDecodeError(path, "decompression bomb", flat(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error,
                zlib.error) as e:
            raise PhotoDecodeError(path, "truncated or corrupt", flat(e)) from None
    if im.mode not in _SUPPORTED_MODES:
        raise PhotoDecodeError(path, "unsupported mode", im.mode)
    return to_rgb8(im), bits


def load_photo(path: str) -> np.ndarray:
    """Fully decode one photo -> uint8 (H, W, 3) sRGB, EXIF orientation applied. The one photo
    reader of the project: the pipeline's photo sources and `deblur` both use it.

    Colour values are taken as sRGB (ICC profiles are not applied). Grayscale is replicated to
    three channels; alpha is dropped (not composited). High bit depth has one policy, grey and
    colour alike: 16-bit samples are reduced to their top 8 bits (>> 8: the full range, never
    clipped at 255; 32-bit integer images are taken as 16-bit data), float images are clipped
    to [0, 1] and scaled by 255 (load_photo_depth says what the file had). The network works on
    8-bit frames: it was trained on them. Multi-frame files give their first frame. Raises
    PhotoDecodeError for a truncated or corrupt file or a decompression bomb (Pillow's limit,
    Image.MAX_IMAGE_PIXELS, stays at its default), OSError when the file cannot be opened.
    """
    return load_photo_depth(path)[0]


def to_rgb8(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image in any supported mode -> uint8 (H, W, 3), C-contiguous."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in _GRAY16 or mode == "I":
        # 16-bit data: keep the full range (a 16-bit PNG opens as I;16, older files as I)
        gray = (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        gray = np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    elif mode in ("1", "L"):
        gray = np.asarray(im.convert("L"))
    elif mode in ("LA", "La"):
        gray = np.asarray(im)[..., 0]  # luminance, alpha dropped
    elif mode in ("P", "PA", "RGBA", "RGBa", "RGBX"):
        # via RGBA so palette transparency is kept apart from the colours, then dropped
        return np.ascontiguousarray(np.asarray(im.convert("RGBA"))[..., :3])
    else:  # CMYK, YCbCr, LAB, HSV: Pillow's own conversion
        return np.array(im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


# Per-process caches of decoded photos (LRU, read-only arrays) and of files that failed to decode
# (so a broken file costs one decode per process; outcomes are the same either way). Memory:
# at most sources.photo_cache_mb of decoded pixels per worker (the latest photo always stays).
_CACHE_LOCK = threading.Lock()
_PHOTO_CACHE: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
_DECODE_FAILURES: dict[str, tuple[str, str]] = {}
_MAX_REMEMBERED_FAILURES = 10_000


def cached_photo(path: str, capacity_mb: float) -> np.ndarray:
    """load_photo through the per-process LRU cache of at most ``capacity_mb`` MB of decoded
    photos (0 disables it; the most recent photo is kept even when it alone is larger). A byte
    budget, not a count: 64 camera-size photos would hold 2.3 GB in every worker.

    The returned array is read-only (it may be shared with later calls). A failure raises
    PhotoDecodeError (or OSError) again on every later call without decoding again.
    """
    with _CACHE_LOCK:
        if path in _PHOTO_CACHE:
            _PHOTO_CACHE.move_to_end(path)
            return _PHOTO_CACHE[path]
        failure = _DECODE_FAILURES.get(path)
    if failure:
        raise PhotoDecodeError(path, *failure)
    try:
        photo = load_photo(path)  # outside the lock: threads decode in parallel
    except PhotoDecodeError as e:
        with _CACHE_LOCK:
            if len(_DECODE_FAILURES) < _MAX_REMEMBERED_FAILURES:
                _DECODE_FAILURES[path] = (e.reason, e.detail)
        raise
    photo.setflags(write=False)
    if capacity_mb > 0:
        with _CACHE_LOCK:
            _PHOTO_CACHE[path] = photo
            while len(_PHOTO_CACHE) > 1 and sum(a.nbytes for a in _PHOTO_CACHE.values()) > capacity_mb * 1e6:
                _PHOTO_CACHE.popitem(last=False)
    return photo


def clear_caches() -> None:
    """Forget every cached photo and remembered failure of this process."""
    with _CACHE_LOCK:
        _PHOTO_CACHE.clear()
        _DECODE_FAILURES.clear()


# ----------------------------------------------------------------------------- canvases


def draw_canvas(rng: np.random.Generator, source: SourceList, canvas: int, cfg) -> tuple[np.ndarray, dict]:
    """Draw one sharp canvas: uint8 (canvas, canvas, 3) sRGB and a JSON-ready dict of the draw.

    Photos: info = {"source": "photo", "path" (relative to the folder, or the file name for
    samples), "photo_size": [w, h] after EXIF rotation, "crop": [x0, y0, x1, y1] in that photo,
    "scale": canvas / crop side, "decode_failures": [[path, reason], ...]}.
    Dead leaves: see ``deadleaves``. ``cfg`` is a pipeline.config.SourceConfig.
    """
    if source.kind == "deadleaves":
        return deadleaves(rng, canvas, cfg)
    if source.kind == "mix":
        weights = np.array([w for w, _ in source.parts], dtype=np.float64)
        k = int(np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(), side="right"))
        k = min(k, len(source.parts) - 1)
        image, info = draw_canvas(rng, source.parts[k][1], canvas, cfg)
        return image, {**info, "mix_component": k}
    if source.kind != "photos" or not source.paths:
        raise SourceError(f"source '{source.spec}' has no photos to draw from")
    n = len(source.paths)
    failed: list[int] = []  # indices that failed in this call, sorted; never drawn twice
    failures: list[list[str]] = []
    for _ in range(min(n, MAX_DRAW_TRIES)):
        # uniform over the files not yet failed: the k-th survivor, skipping failed indices
        k = int(rng.integers(n - len(failed)))
        for f in failed:
            k += k >= f
        path = source.paths[k]
        try:
            photo = cached_photo(path, cfg.photo_cache_mb)
        except PhotoDecodeError as e:
            failures.append([source.name(path), f"{e.reason} ({e.detail})"])
            bisect.insort(failed, k)
            continue
        except OSError as e:
            failures.append([source.name(path), f"unreadable ({flat(e)})"])
            bisect.insort(failed, k)
            continue
        image, crop = crop_photo(rng, photo, canvas, cfg.photo_scale_min, cfg.photo_scale_max)
        h, w = photo.shape[:2]
        info = {"source": "photo", "path": source.name(path), "photo_size": [w, h], "crop": crop,
                "scale": canvas / (crop[2] - crop[0]), "decode_failures": failures}
        return image, info
    where = source.root or source.spec
    raise SourceError(f"no photo of {where} could be decoded in {len(failures)} tries "
                      f"(last: {failures[-1][0]}: {failures[-1][1]})")


def crop_photo(rng: np.random.Generator, photo: np.ndarray, canvas: int, scale_min: float,
               scale_max: float) -> tuple[np.ndarray, list[int]]:
    """A random square of ``photo`` (uint8 (H, W, 3)) resized to uint8 (canvas, canvas, 3).

    The scale s is log-uniform in [scale_min, scale_max]; the box side is round(canvas / s), or
    the photo's shorter side if that is smaller (then the effective scale is larger than s).
    Downscaling uses Lanczos (it averages away JPEG artefacts and sensor noise); a box equal to
    the canvas is copied as is. Returns (canvas, [x0, y0, x1, y1]); the canvas is a new,
    writeable array.
    """
    h, w = photo.shape[:2]
    s = scale_min * (scale_max / scale_min) ** float(rng.random())
    box = min(max(1, round(canvas / s)), h, w)
    x0 = int(rng.integers(w - box + 1))
    y0 = int(rng.integers(h - box + 1))
    crop = photo[y0:y0 + box, x0:x0 + box]
    if box == canvas:
        out = np.array(crop)
    elif box > canvas:
        # reducing_gap: an exact box reduce by an integer factor first, so Lanczos (the costly
        # step, ~1.7 ms for 420 -> 210 px) never reduces by more than 2x
        out = np.array(Image.fromarray(np.ascontiguousarray(crop)).resize(
            (canvas, canvas), Image.Resampling.LANCZOS, reducing_gap=2.0))
    else:
        # upscaling only happens for photos smaller than the canvas (list them with
        # min_side=canvas to avoid it); bicubic rings less than Lanczos there
        out = np.array(Image.fromarray(np.ascontiguousarray(crop)).resize(
            (canvas, canvas), Image.Resampling.BICUBIC))
    return out, [x0, y0, x0 + box, y0 + box]


# ----------------------------------------------------------------------------- dead leaves


def deadleaves(rng: np.random.Generator, canvas: int, cfg) -> tuple[np.ndarray, dict]:
    """A dead-leaves image: uint8 (canvas, canvas, 3) sRGB, and {"source", "disks", "uncovered_px"}.

    Disks fall front to back: radii with density ~ r^-alpha on [r_min, r_max] (alpha = 3 gives
    each octave of scale the same covered area, i.e. scale invariance), centres uniform over
    the canvas grown by the radius, colours of random brightness and saturation. A share of the
    disks carry a texture (a sinusoidal grating between two colours, or a linear gradient across
    the disk), so there is fine detail inside shapes as well as at their edges. Each pixel takes
    the colour of the first disk that covers it; the draw stops at the disk that completes the
    coverage ("disks" in the info), or at ``deadleaves_max_disks``, after which the few pixels
    still uncovered ("uncovered_px") get one extra background colour. A Gaussian blur of
    ``deadleaves_smooth`` px (taps out to 3σ, borders mirrored) anti-aliases the disk edges.

    All ``deadleaves_max_disks`` disks are drawn from ``rng`` every time (a fixed number of
    draws), so the generator ends in the same state however early the canvas is covered.
    """
    n = int(cfg.deadleaves_max_disks)
    rmin = float(cfg.deadleaves_rmin)
    rmax = max(rmin, float(cfg.deadleaves_rmax_frac) * canvas)
    a = 1.0 - float(cfg.deadleaves_alpha)  # alpha > 1, so a < 0

    # geometry in float64 (pixel-exact coverage), the rest in float32
    u = rng.random((3, n))
    r = (rmin ** a + u[0] * (rmax ** a - rmin ** a)) ** (1.0 / a)  # inverse CDF of r^-alpha
    cx = u[1] * (canvas - 1 + 2 * r) - r
    cy = u[2] * (canvas - 1 + 2 * r) - r
    label = first_cover(cx, cy, r, canvas, canvas)  # int32 (H, W), n where uncovered

    colour = _random_colours(rng, n + 1)  # the extra row is the background
    textured = rng.random(n + 1, dtype=np.float32) < cfg.deadleaves_texture_prob
    textured[n] = False
    tex_disk = np.flatnonzero(textured)
    m = tex_disk.size
    colour2 = _random_colours(rng, m)
    # per textured disk: amplitude, grating or gradient, period, angle, phase
    amp, kind, period, angle, phase = rng.random((5, m), dtype=np.float32)

    # Per-disk tables (n + 1 entries, zero where untextured), gathered per pixel below. A texture
    # is a weight w(x, y) in [0, 1] that mixes the disk's colour towards a second colour:
    # a grating 0.5 + 0.5 sin(s) or a gradient clip(s, 0, 1), with s linear in (x, y).
    period = np.float32(2.5) * np.float32(16.0) ** period  # 2.5 .. 40 px, log-uniform
    ux, uy = np.cos(angle * np.float32(2 * np.pi)), np.sin(angle * np.float32(2 * np.pi))
    grating = kind < 0.5
    rad = r[tex_disk].astype(np.float32)
    # grating: s = 2 pi <p - c, u> / period + phase; gradient: s = 0.5 + <p - c, u> / (2 r)
    gain = np.where(grating, np.float32(2 * np.pi) / period, 0.5 / rad)
    offset = np.where(grating, phase * np.float32(2 * np.pi), np.float32(0.5))
    fx, fy = gain * ux, gain * uy
    plane = np.zeros((3, n + 1), dtype=np.float32)  # s = fx · x + fy · y + f0 per disk
    plane[:, tex_disk] = (fx, fy, offset - fx * cx[tex_disk] - fy * cy[tex_disk])
    is_grating = np.zeros(n + 1, dtype=bool)
    is_grating[tex_disk] = grating
    delta = np.zeros((3, n + 1), dtype=np.float32)  # second colour - colour, times the amplitude
    delta[:, tex_disk] = (0.25 + 0.75 * amp) * (colour2 - colour[:, tex_disk])
    # the smoothing below leaves its planes divided by the centre tap once per axis: build them
    # multiplied by its square, so no separate normalizing pass is needed
    taps = _gaussian_taps(float(cfg.deadleaves_smooth))
    colour *= np.float32(taps[0] ** 2)
    delta *= np.float32(taps[0] ** 2)

    # 1/f noise textures, the illumination field, defocus and contrast: drawn after everything
    # above, a fixed number of draws per image
    noisy = rng.random(m) < cfg.deadleaves_noise_texture
    is_noise = np.zeros(n + 1, dtype=bool)
    is_noise[tex_disk] = noisy
    texture, illumination = _noise_fields(rng, canvas, cfg)
    dof_draw, dof_depth, dof_sigma, contrast_u = rng.random(4)
    dof = bool(dof_draw < cfg.deadleaves_dof_prob)
    contrast = float(cfg.deadleaves_contrast_min ** contrast_u)  # log-uniform in [min, 1]

    index = label.astype(np.intp)  # gathers with intp indices skip a conversion each
    fx, fy, f0 = np.take(plane, index, axis=1)
    s = fx * np.arange(canvas, dtype=np.float32)
    fy *= np.arange(canvas, dtype=np.float32)[:, None]
    s += fy
    s += f0
    weight = np.sin(s)
    weight *= np.float32(0.5)
    weight += np.float32(0.5)
    gradient = np.clip(s, np.float32(0.0), np.float32(1.0), out=s)
    np.copyto(weight, gradient, where=~np.take(is_grating, index))
    np.copyto(weight, texture, where=np.take(is_noise, index))
    planes = np.take(delta, index, axis=1)  # sRGB in [0, 255], channel first: (3, H, W)
    planes *= weight
    planes += np.take(colour, index, axis=1)
    if len(taps) > 1:
        rows_done = _smooth_reflect(planes, taps, 2, np.empty_like(planes))
        planes = _smooth_reflect(rows_done, taps, 1, out=planes)
    if dof:  # disks behind a depth (a share of the pixels stays sharp) are out of focus
        depth = int(np.quantile(label, 0.2 + 0.6 * dof_depth))
        sigma = 0.5 + (cfg.deadleaves_dof_max_px - 0.5) * float(dof_sigma)
        far = _gaussian_blur(planes, sigma)
        np.copyto(planes, far, where=(label > depth)[None])
    if contrast < 1.0:
        mean = planes.mean(axis=(1, 2), keepdims=True)
        planes -= mean
        planes *= np.float32(contrast)
        planes += mean
    if illumination is not None:
        planes *= illumination
    # Colours and textures are convex combinations of colours in [0, 255] and the smoothing's
    # taps are positive and sum to 1, so only the illumination can leave [0, 255]: clip, then
    # round half up.
    np.clip(planes, np.float32(0.0), np.float32(255.0), out=planes)
    out = np.empty((canvas, canvas, 3), dtype=np.uint8)
    np.add(planes, np.float32(0.5), out=out.transpose(2, 0, 1), casting="unsafe")

    uncovered = int(np.count_nonzero(label == n))
    disks = n if uncovered else int(label.max()) + 1
    return out, {"source": "deadleaves", "disks": disks, "uncovered_px": uncovered}


def _noise_fields(rng: np.random.Generator, canvas: int, cfg) -> tuple[np.ndarray, np.ndarray | None]:
    """Two random fields of one dead-leaves image.

    texture: float32 (canvas, canvas) in [0, 1], a 1/f^slope noise (amplitude spectrum; slope
    uniform in [noise_slope_min, noise_slope_max]: natural textures have slopes near 1),
    standardized and mapped to 0.5 + 0.2·z, clipped. It is drawn in the frequency domain (white
    complex Gaussian coefficients, shaped, one inverse FFT), which is what transforming white noise
    would give, minus a forward FFT. illumination: float32 (canvas, canvas) exp(σ·z) of a smooth
    field z (four plane waves of random direction and phase, 0.3 to 1.5 cycles per canvas,
    standardized) divided by its mean, or None when ``deadleaves_illumination`` is 0. Always draws
    the same numbers from ``rng``.
    """
    half = canvas // 2 + 1
    coeffs = standard_noise(rng, (2, canvas, half))  # real and imaginary parts
    slope = np.float32(cfg.deadleaves_noise_slope_min
                       + (cfg.deadleaves_noise_slope_max - cfg.deadleaves_noise_slope_min) * rng.random())
    waves = rng.random((4, 3))  # per wave: frequency, direction, phase
    fy = sfft.fftfreq(canvas).astype(np.float32)[:, None]
    fx = sfft.rfftfreq(canvas).astype(np.float32)[None, :]
    f2 = fx * fx + fy * fy
    f2[0, 0] = 1.0
    gain = f2 ** (-slope / 2)
    gain[0, 0] = 0.0
    spec = np.empty((canvas, half), np.complex64)
    np.multiply(coeffs[0], gain, out=spec.real)
    np.multiply(coeffs[1], gain, out=spec.imag)
    field = sfft.irfft2(spec, s=(canvas, canvas), overwrite_x=True)
    field *= np.float32(0.2) / max(float(field.std()), 1e-12)
    field += np.float32(0.5)
    texture = np.clip(field, np.float32(0.0), np.float32(1.0), out=field)
    if cfg.deadleaves_illumination <= 0:
        return texture, None
    # sum of plane waves cos(kx·x + ky·y + phase) = Re(e^{i (ky y + phase)} e^{i kx x}): one
    # (canvas, 4) @ (4, canvas) product of complex exponentials, real part by two real products
    pos = np.arange(canvas) / canvas
    k = 2 * np.pi * (0.3 + 1.2 * waves[:, 0])
    ex = np.exp(1j * np.outer(pos, k * np.cos(2 * np.pi * waves[:, 1])))  # (canvas, 4)
    ey = np.exp(1j * (np.outer(pos, k * np.sin(2 * np.pi * waves[:, 1])) + 2 * np.pi * waves[:, 2]))
    z = ey.real @ ex.real.T - ey.imag @ ex.imag.T
    z *= cfg.deadleaves_illumination / max(float(z.std()), 1e-12)
    light = np.exp(z.astype(np.float32))
    light /= light.mean(dtype=np.float64)
    return texture, light


def _gaussian_blur(planes: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of float32 (3, H, W) planes over H and W (borders mirrored): a new array."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(planes, sigma=(0.0, sigma, sigma), mode="reflect", truncate=3.0)


def _gaussian_taps(sigma: float) -> np.ndarray:
    """Half of a normalized Gaussian filter: float64 [w_0, ..., w_R], R = int(3σ + 0.5) (the taps
    of scipy.ndimage.gaussian_filter with truncate=3). [1.0] when σ is too small to have a tap."""
    R = int(3.0 * sigma + 0.5)
    if R == 0:
        return np.ones(1)
    w = np.exp(-0.5 * (np.arange(R + 1) / sigma) ** 2)
    return w / (w[0] + 2 * w[1:].sum())


def _smooth_reflect(src: np.ndarray, taps: np.ndarray, axis: int, out: np.ndarray) -> np.ndarray:
    """Symmetric filter of float32 ``src`` along ``axis`` into ``out`` (same shape, not
    overlapping), borders mirrored as scipy.ndimage's mode="reflect" (d c b a | a b c d | d c b a),
    divided by taps[0] (the caller pre-multiplies by taps[0] per axis, saving a pass).

    The interior is sum_j taps_|j| / taps_0 · src[i + j], evaluated Horner-like from the
    outermost pair inwards (one ratio of neighbouring taps at a time: 3 passes per pair, no
    padded copy); the R border positions on each side are summed one by one.
    """
    R = len(taps) - 1
    n = src.shape[axis]
    if R > n:
        raise ValueError(f"deadleaves_smooth reaches {R} px past a {n} px canvas")

    def at(lo: int, hi: int, a: np.ndarray = src) -> np.ndarray:  # a[lo:hi] along the axis
        idx = [slice(None)] * a.ndim
        idx[axis] = slice(lo, hi)
        return a[tuple(idx)]

    if n > 2 * R:
        inner = at(R, n - R, out)
        np.add(at(0, n - 2 * R), at(2 * R, n), out=inner)
        for j in range(R - 1, -1, -1):
            inner *= np.float32(taps[j + 1] / taps[j])
            inner += at(R - j, n - R - j)
            if j > 0:
                inner += at(R + j, n - R + j)
    weight = (taps / taps[0]).astype(np.float32)
    for i in sorted(set(range(min(R, n))) | set(range(max(n - R, 0), n))):
        edge = at(i, i + 1, out)
        np.multiply(at(i, i + 1), weight[0], out=edge)
        for j in range(1, R + 1):
            for k in (i - j, i + j):
                k = -k - 1 if k < 0 else (2 * n - k - 1 if k >= n else k)  # mirror
                edge += weight[j] * at(k, k + 1)
    return out


def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 (3, n) sRGB colours in [0, 255]: random brightness, chroma direction, saturation."""
    u = rng.random((5, n), dtype=np.float32)
    rgb = u[:3]
    chroma = rgb - (rgb[0] + rgb[1] + rgb[2]) / 3
    # squared saturation: near-greys are common, as in photographs; 1.5 lets some colours reach
    # the gamut's edge (clipped there)
    colour = u[3] + np.float32(1.5) * (u[4] * u[4]) * chroma
    np.clip(colour, 0, 1, out=colour)
    return colour * np.float32(255)


def first_cover(cx: np.ndarray, cy: np.ndarray, r: np.ndarray, h: int, w: int) -> np.ndarray:
    """For each pixel, the index of the first disk that covers it: int32 (h, w), len(r) if none.

    Pixel (x, y) has its centre at integer (x, y) and is covered by disk i when
    (x - cx_i)^2 + (y - cy_i)^2 <= r_i^2. This is what painting the disks front to back with a
    coverage mask gives, computed without a Python loop over disks: each disk becomes one span
    [xl, xr] per row it crosses; a span is split into two overlapping power-of-two blocks whose
    min-updates go into a sparse table (levels x h x w), and pushing the table down the levels
    leaves the per-pixel minimum. Cost ~ number of spans + levels * h * w, not the disks' area.
    """
    n = len(r)
    y0 = np.maximum(np.ceil(cy - r), 0).astype(np.int32)
    y1 = np.minimum(np.floor(cy + r), h - 1).astype(np.int32)
    rows = np.maximum(y1 - y0 + 1, 0)
    disk = np.repeat(np.arange(n, dtype=np.intp), rows)  # one entry per (disk, row) span
    first_row = np.cumsum(rows, dtype=np.int32) - rows
    y = np.arange(disk.size, dtype=np.int32) + np.repeat(y0 - first_row, rows)
    dy = y - cy[disk]
    half = np.sqrt(np.maximum((r * r)[disk] - dy * dy, 0.0))
    xc = cx[disk]
    xl = np.maximum(np.ceil(xc - half), 0).astype(np.int32)
    xr = np.minimum(np.floor(xc + half), w - 1).astype(np.int32)
    # a row may hold no pixel centre of the disk, or lie beside the canvas: such spans stay in
    # place as no-op updates (value n at a valid position), cheaper than compressing the arrays
    dtype = np.int16 if n < np.iinfo(np.int16).max else np.int32
    value = disk.astype(dtype)
    value[xl > xr] = n
    length = np.maximum(xr - xl + 1, 1)
    np.minimum(xl, w - 1, out=xl)
    # floor(log2(length)), exactly, from the exponent field of the float32 (integers < 2^24)
    level = (length.astype(np.float32).view(np.int32) >> 23) - 127
    levels = int(level.max()) + 1 if level.size else 1
    start2 = np.maximum(xr - (1 << level) + 1, 0)  # the second block ends where the span ends

    label = np.empty((h, w), dtype=np.int32)
    # bands of rows bound the table's memory on big canvases (one band up to ~1000^2 px)
    band = max(1, _TABLE_ENTRIES // (levels * w))
    for b0 in range(0, h, band):
        b1 = min(h, b0 + band)
        sel = slice(None) if band >= h else (y >= b0) & (y < b1)
        label[b0:b1] = _span_min(xl[sel], start2[sel], y[sel] - b0, level[sel], value[sel],
                                 levels, b1 - b0, w, n)
    return label


_TABLE_ENTRIES = 10 * 1024 * 1024  # entries of first_cover's sparse table (20-40 MiB)


def _span_min(xl, start2, y, level, value, levels: int, h: int, w: int, empty: int) -> np.ndarray:
    """Per-pixel min of ``value`` over row spans: (h, w) of value's dtype, ``empty`` if none.

    Each span of row y is given as two blocks of length 2^level, at xl and at start2, which
    overlap and together cover it exactly (min does not mind the overlap).
    """
    table = np.full((levels, h, w), empty, dtype=value.dtype)
    base = level * (h * w) + y * w
    np.minimum.at(table.reshape(-1), np.concatenate([base + xl, base + start2]),
                  np.concatenate([value, value]))
    for k in range(levels - 1, 0, -1):  # a block of 2^k at x = blocks of 2^(k-1) at x and x + 2^(k-1)
        step = 1 << (k - 1)
        np.minimum(table[k - 1], table[k], out=table[k - 1])
        np.minimum(table[k - 1, :, step:], table[k, :, :w - step], out=table[k - 1, :, step:])
    return table[0]
