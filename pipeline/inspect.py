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
from pipeline.format import (LOCK, MANIFEST, PLAN, DataError, Manifest, ShardEntry, as_location, check_tree,
                             decode_sample, is_temporary, is_url, iter_shard, join, parse_key, read_location,
                             read_manifest, shard_file, stats_file, wids_file, wids_index)


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


def contact_sheet(data_dir: str | Path, split: str | None = None, index: int | None = None,
                  key: str | None = None, out: str | Path | None = None) -> Path:
    """Write target | every frame, with every kernel enlarged beneath, and a caption.

    The sample is ``key``, or sample ``index`` of ``split`` (default: the manifest's first split);
    an unknown split or an index out of range is a DataError (one line). ``data_dir`` may be a
    dataset URL; ``out`` then defaults to ``<key>.png`` in the current folder."""
    man = read_manifest(data_dir)
    if key is None:
        key = man.key(split or next(iter(man.splits)), index)
    split = man.split(parse_key(key).split).name
    sample = read_sample(data_dir, key, man)
    params = sample["params"]
    row = params.get("kernel_row")
    kern = _kernel_row(data_dir, man, split, row, key)
    burst, target = sample["burst"], sample["target"]
    F, S = burst.shape[0], burst.shape[1]
    pad, text_h = 4, 46
    sheet = Image.new("RGB", (pad + (F + 1) * (S + pad), pad + 2 * (S + pad) + text_h), "white")
    sheet.paste(Image.fromarray(target), (pad, pad))
    for i in range(F):
        x = pad + (i + 1) * (S + pad)
        sheet.paste(Image.fromarray(burst[i]), (x, pad))
        k = kern[i] / max(float(kern[i].max()), 1e-12)
        kimg = Image.fromarray((np.sqrt(k) * 255).astype(np.uint8)).resize((S, S), Image.Resampling.NEAREST)
        sheet.paste(kimg.convert("RGB"), (x, pad + S + pad))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad + S + pad), "target | frames\nkernels (sqrt) below", fill="black")
    for j, line in enumerate(_caption(params)):
        draw.text((pad, pad + 2 * (S + pad) + 2 + 14 * j), line, fill="black")
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
