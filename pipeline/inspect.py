"""Look at a rendered dataset: a summary, a contact sheet of one sample, a check of every shard.

Every read goes through pipeline.format: the manifest is read and validated by ``read_manifest``,
shards are read by ``iter_shard`` (regular members of this shard only) and samples decoded by
``decode_sample`` (shapes against the manifest before anything is allocated); a problem is one
DataError line. The summary and the contact sheet also read a dataset URL (http(s), or any fsspec
URL: ``pipeline.format.open_location``); verify reads local folders only.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
from pathlib import Path

import numpy as np
import zarr
from PIL import Image, ImageDraw

from common.errors import UserError, one_line
from common.files import atomic_path
from common.fonts import label_font, text_size
from pipeline.format import (LOCK, MANIFEST, PLAN, DataError, Manifest, ShardEntry, as_location, check_tree,
                             decode_json, decode_sample, is_temporary, is_url, iter_shard, join, parse_key,
                             read_location, read_manifest, shard_file, stats_file, wids_file, wids_index)


def read_sample(data_dir: str | Path, key: str, manifest: Manifest | None = None) -> dict:
    """Read one sample from its shard: {"key", "burst" uint8 (F,S,S,3), "target" uint8 (S,S,3), "params"}.

    The shard is read (``pipeline.format.iter_shard``) up to the sample; shapes are checked
    against the manifest (read if not given) before decoding. A bad key, a sample the shard does
    not hold, a member that is not a regular file or does not decode is a DataError naming the
    shard (and member); a missing shard is a FileNotFoundError.
    """
    split, shard, _ = parse_key(key)
    man = manifest if manifest is not None else read_manifest(data_dir)
    tar_path = join(as_location(data_dir), shard_file(split, shard))
    if not is_url(tar_path) and not tar_path.is_file():
        raise FileNotFoundError(f"{tar_path}: no such shard")
    for raw in iter_shard(tar_path):
        if raw["__key__"] == key:
            return decode_sample(raw, str(tar_path), man.frames, man.size)
    raise DataError(f"sample {key} is not in {shard_file(split, shard)}")


def _quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    q = np.quantile(np.asarray(values), [0.0, 0.1, 0.5, 0.9, 1.0])
    return "  ".join(f"{v:.3g}" for v in q)


def summary(data_dir: str | Path) -> str:
    """Splits, shards, samples, bytes, config hash, distributions of blur size and noise level."""
    man = read_manifest(data_dir)
    lines = [f"dataset {man.name}  config {man.config_hash}  code {man.code_version}  seed {man.seed}",
             f"{man.frames} frames of {man.size}x{man.size}, kernels {man.kernel_size}x{man.kernel_size}",
             f"{'split':<8}{'source':<22}{'shards':>7}{'samples':>9}{'MB':>9}  skipped inputs"]
    blur, noise = [], []
    for split, s in man.splits.items():
        size = sum(sh.bytes for sh in s.shards) / 1e6
        skipped = ", ".join(f"{v['count']} {r}" for r, v in s.skipped.items()) or "none"
        lines.append(f"{split:<8}{s.source[:21]:<22}{len(s.shards):>7}{s.samples:>9}{size:>9.1f}  {skipped}")
        for entry in s.shards:
            st = json.loads(_read(join(as_location(data_dir), stats_file(split, entry.shard))))
            blur += st["blur_px"]
            noise += st["noise_std_mid_grey"]
    lines.append("quantiles (min 10% 50% 90% max):")
    lines.append(f"  blur RMS radius, px          {_quantiles(blur)}")
    lines.append(f"  noise std at linear 0.18     {_quantiles(noise)}")
    return "\n".join(lines)


def _caption(params: dict) -> list[str]:
    src = params["source"]
    where = src.get("path", src.get("source", "?"))
    return [f"{params['key']}   source {where} {src.get('crop', '')}",
            f"gamma {params['gamma']:.2f}  shot {params['shot_noise']:.4f}  read {params['read_noise']:.4f}  "
            f"corr {params['noise_correlation_px']:.2f}px  highlights x{params['highlight_gain']:.2f}",
            f"blur scale {params['blur_scale']:.2f}px  {'mixed' if params['mixed'] else 'uniform'} burst  "
            f"radius per frame {', '.join(f'{r:.1f}' for r in params['kernel_radius_px'])}"]


def _read(location) -> bytes:
    """A small file of the dataset (a stats file, zarr metadata), local or over a URL; DataError if unreadable."""
    try:
        return read_location(location)
    except (OSError, http.client.HTTPException) as e:  # FileNotFoundError (an HTTP 404) included
        raise DataError(f"{location}: unreadable ({type(e).__name__}: {one_line(e)})") from None


def _kernel_row(data_dir, man: Manifest, split: str, row, key: str) -> np.ndarray:
    """float32 (frames, K, K): row ``row`` of kernels.zarr/<split>. Over a URL, the zarr metadata
    and the chunks of that row (the manifest's kernel_files under <split>/c/<chunk>/) are fetched
    into a temporary folder and read there with zarr: the zarr store of a URL would need fsspec's
    asynchronous http filesystem (aiohttp), which the project does not install."""
    import tempfile

    if not is_url(data_dir):
        kernels = zarr.open_group(str(Path(data_dir) / man.kernels), mode="r")[split]
        if type(row) is not int or not 0 <= row < kernels.shape[0]:
            raise DataError(f"sample {key}: json kernel_row {row!r} is not a row of {man.kernels}/{split}")
        return np.asarray(kernels[row])
    base = join(as_location(data_dir), man.kernels)
    meta = json.loads(_read(f"{base}/{split}/zarr.json"))
    rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    if type(row) is not int or not 0 <= row < meta["shape"][0]:
        raise DataError(f"sample {key}: json kernel_row {row!r} is not a row of {man.kernels}/{split}")
    prefix = f"{split}/c/{row // rows}/"
    wanted = ["zarr.json", f"{split}/zarr.json"] + [e["file"] for e in man.kernel_files or ()
                                                     if e["file"].startswith(prefix)]
    with tempfile.TemporaryDirectory() as tmp:
        for rel in wanted:
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(_read(f"{base}/{rel}"))
        return np.asarray(zarr.open_group(tmp, mode="r")[split][row])


def typical_index(data_dir: str | Path, split: str, manifest: Manifest | None = None) -> int:
    """The index of a sample of typical blur in ``split``: the median, over the samples of the
    split's first shard (only that shard is read, and only its json members are decoded), of
    the per-sample blur (``pipeline.render.sample_stats`` blur_px: the mean over frames of the
    kernels' RMS radius, the figure the summary's quantiles are of). With an even count the
    lower of the two middle samples; ties go to the lower index."""
    from pipeline.render import sample_stats

    man = manifest if manifest is not None else read_manifest(data_dir)
    entry = man.shards(split)[0]
    blur = []
    for raw in iter_shard(join(as_location(data_dir), entry.file), label=entry.file):
        params = decode_json(raw.get("json", b""), f"{entry.file}: sample {raw['__key__']}: json")
        blur.append((sample_stats(params)["blur_px"], parse_key(raw["__key__"]).index))
    if not blur:
        raise DataError(f"{entry.file}: no samples")
    return sorted(blur)[(len(blur) - 1) // 2][1]


def _frame_labels(params: dict, noise: float) -> list[str]:
    """Per frame: number (frame 0 is the reference; outliers said), blur RMS radius, noise."""
    radius, outlier = params["kernel_radius_px"], params.get("outlier") or []
    labels = []
    for i, r in enumerate(radius):
        tag = " ref" if i == 0 else " outlier" if i < len(outlier) and outlier[i] else ""
        labels.append(f"frame {i}{tag}\nblur {r:.2f} px\nnoise {noise:.4f}")
    return labels


SCALE_BAR_PX = 5  # kernel pixels the scale bar under the kernels spans


def contact_sheet(data_dir: str | Path, split: str | None = None, index: int | None = None,
                  key: str | None = None, out: str | Path | None = None) -> Path:
    """Write a contact sheet PNG of one sample: target | every frame, each labelled (frame
    number, blur = its kernel's RMS radius in px, noise = std at linear mid grey, from the
    sample's json), every kernel beneath (sqrt of its peak-normalized values, enlarged by a
    stated factor, with a scale bar of SCALE_BAR_PX kernel pixels), and a caption.

    The sample is ``key``, or sample ``index`` of ``split`` (default: the manifest's first split);
    with neither, the sample of typical blur (``typical_index``, the median of the split's first
    shard), not sample 0. An unknown split or an index out of range is a DataError (one line).
    ``data_dir`` may be a dataset URL; ``out`` then defaults to ``<key>.png`` in the current folder."""
    from pipeline.render import sample_stats

    man = read_manifest(data_dir)
    if key is None:
        split = split or next(iter(man.splits))
        key = man.key(split, typical_index(data_dir, split, man) if index is None else index)
    split = man.split(parse_key(key).split).name
    sample = read_sample(data_dir, key, man)
    params = sample["params"]
    kern = _kernel_row(data_dir, man, split, params.get("kernel_row"), key)
    burst, target = sample["burst"], sample["target"]
    F, S, K = burst.shape[0], burst.shape[1], kern.shape[-1]
    noise = sample_stats(params)["noise_std_mid_grey"]
    labels = ["target\nsharp"] + _frame_labels(params, noise)
    scale = S / K
    kernel_note = f"kernels\n(sqrt)\nshown x{scale:.1f}"
    font, small = label_font(16), label_font(12)

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = max([S] + [text_size(probe, t, small)[0] + 4 for t in labels + [kernel_note]])
    label_h = max(text_size(probe, t, small)[1] for t in labels) + 6
    note_h = text_size(probe, kernel_note, small)[1] + 4
    kernel_h = max(S, note_h + 4 + text_size(probe, "5 px", small)[1] + 6)  # note, scale bar, its label
    caption = _caption(params) + [f"blur: RMS radius of each frame's kernel; noise: std at linear "
                                  f"0.18 (white = 1); kernels {K}x{K} px shown x{scale:.1f}"]
    line_h = text_size(probe, "Hg", font)[1] + 4
    caption_w = max(text_size(probe, line, font)[0] for line in caption)
    pad = 6
    width = max(pad + (F + 1) * (cell + pad), 2 * pad + caption_w)
    height = pad + S + label_h + pad + kernel_h + pad + line_h * len(caption) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y_kern = pad + S + label_h + pad
    for i in range(F + 1):
        x = pad + i * (cell + pad)
        xi = x + (cell - S) // 2
        sheet.paste(Image.fromarray(target if i == 0 else burst[i - 1]), (xi, pad))
        draw.multiline_text((x + 2, pad + S + 3), labels[i], fill="black", font=small, spacing=2)
        if i == 0:  # the kernels' column under the target: what they show and a scale bar
            draw.multiline_text((x + 2, y_kern), kernel_note, fill="black", font=small, spacing=2)
            bar = round(SCALE_BAR_PX * scale)
            yb = y_kern + note_h
            draw.rectangle((x + 2, yb, x + 2 + bar, yb + 3), fill="black")
            draw.text((x + 2, yb + 4), f"{SCALE_BAR_PX} px", fill="black", font=small)
            continue
        k = kern[i - 1] / max(float(kern[i - 1].max()), 1e-12)
        kimg = Image.fromarray((np.sqrt(k) * 255).astype(np.uint8)).resize((S, S), Image.Resampling.NEAREST)
        sheet.paste(kimg.convert("RGB"), (xi, y_kern))
    y = y_kern + kernel_h + pad
    for line in caption:
        draw.text((pad, y), line, fill="black", font=font)
        y += line_h
    out = Path(out) if out else Path(f"{key}.png") if is_url(data_dir) else Path(data_dir) / f"{key}.png"
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="png")
    return out


@dataclasses.dataclass
class Report:
    """What ``check_dataset`` found, one line each. ``errors``: the folder is not the dataset its
    manifest describes (a bad shard, a missing, changed or extra kernels.zarr file, a temporary
    file, a tar the manifest does not list); ``warnings``: other files that are not part of the
    dataset, and kernels.zarr not checked because an older manifest records no checksums for it."""

    errors: list[str]
    warnings: list[str]
    kernels_checked: bool


def check_dataset(data_dir: str | Path) -> Report:
    """Check a dataset folder against its manifest: every shard (``check_shard``), every file of
    kernels.zarr (size and sha256, when the manifest records them), and files that are not part
    of the dataset (``stray_files``). Raises FileNotFoundError / DataError for a bad manifest."""
    if is_url(data_dir):
        raise UserError(f"verify reads a local dataset folder, not a URL ({data_dir}): download the folder "
                        "and verify it there (training and evaluation check each shard's sha256 over a URL)")
    data_dir = Path(data_dir)
    man = read_manifest(data_dir)
    errors, warnings = [], []
    for s in man.splits.values():
        for entry in s.shards:
            problem = check_shard(data_dir, man, entry)
            if problem:
                errors.append(problem)
    checked = man.kernel_files is not None
    if checked:
        errors += check_tree(data_dir / man.kernels, list(man.kernel_files), man.kernels)
    else:
        warnings.append(f"{man.kernels}: not checked: this manifest (from an older pipeline) records no "
                        "checksums of its files; render the dataset again to record them")
    stray_errors, stray_warnings = stray_files(data_dir, man)
    return Report(errors + stray_errors, warnings + stray_warnings, checked)


def verify(data_dir: str | Path) -> str | None:
    """Check every shard, kernels.zarr and the folder against the manifest (``check_dataset``).
    Returns None when all is well, else the first error line."""
    report = check_dataset(data_dir)
    return report.errors[0] if report.errors else None


def check_shard(data_dir: Path, man: Manifest, entry: ShardEntry) -> str | None:
    """One shard against its manifest entry: size, then sha256, the members (regular files of this
    shard's keys, ``pipeline.format.iter_shard``) and the sample count, then every sample decoded
    with the declared shapes (``decode_sample``). None if all is well, else a one-line description
    of its first problem."""
    path = data_dir / entry.file
    if not path.is_file():
        return f"{entry.file}: missing"
    size = path.stat().st_size
    if size != entry.bytes:
        return f"{entry.file}: {size} bytes, manifest says {entry.bytes}"
    try:
        for raw in iter_shard(path, label=entry.file, sha256=entry.sha256, samples=entry.samples, first=entry.first):
            decode_sample(raw, entry.file, man.frames, man.size)
    except DataError as e:
        return str(e)
    return None


def stray_files(data_dir: Path, man: Manifest) -> tuple[list[str], list[str]]:
    """Files in the dataset folder that the manifest does not account for, one line each, as
    (errors, warnings). Errors: temporary files of unfinished writes (ours, zarr's), the plan file
    of an unfinished render, tars the manifest does not list; a finished dataset holds none.
    Warnings: any other file (a contact sheet written into the folder, notes). The render lock
    (``.render.lock``) is ignored; files inside kernels.zarr are ``check_tree``'s. The shard lists
    ``<split>.wids.json`` are part of the dataset: one that differs from what the manifest implies
    (``wids_index``) is an error, a missing one (a folder rendered before they existed) a warning."""
    listed = {MANIFEST, LOCK}
    for s in man.splits.values():
        for e in s.shards:
            listed |= {e.file, stats_file(e.split, e.shard)}
    errors, warnings = [], []
    for split in man.splits:  # the shard lists for wids: derived from the manifest, so checked against it
        name = wids_file(split)
        listed.add(name)
        if not (data_dir / name).is_file():
            warnings.append(f"{name}: missing (webdataset's wids reads it; render the dataset again to write it)")
        elif (data_dir / name).read_bytes() != wids_index(man, split):
            errors.append(f"{name}: does not match the manifest's shards of split '{split}'")
    kernels = man.kernels
    for folder, dirs, files in os.walk(data_dir):
        rel_dir = Path(folder).relative_to(data_dir)
        dirs.sort()
        files += [d for d in dirs if (Path(folder) / d).is_symlink()]  # not walked: reported as entries
        for name in sorted(files):
            rel = (rel_dir / name).as_posix()
            if is_temporary(name):
                errors.append(f"{rel}: a temporary file of an unfinished write (a finished dataset holds none)")
            elif rel in listed or rel.startswith(f"{kernels}/"):
                continue
            elif rel == PLAN:
                errors.append(f"{rel}: a render of this folder has not finished (run it again)")
            elif rel.endswith(".tar") and rel_dir == Path("."):
                errors.append(f"{rel}: a tar the manifest does not list")
            else:
                warnings.append(f"{rel}: not part of the dataset (the manifest does not list it)")
    return errors, warnings
