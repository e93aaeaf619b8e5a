"""Look at a rendered dataset: a summary, a contact sheet of one sample, a check of every shard.

Every read goes through pipeline.format: the manifest is validated, tar members must be regular
files, and members are decoded by its checked decoders (a problem is one DataError line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import zarr
from PIL import Image, ImageDraw

from pipeline.format import (KEY, LOCK, MANIFEST, MEMBERS, PLAN, STATS_DIR, DataError, check_member, check_tree,
                             decode_json, decode_npy, decode_png, is_temporary, read_manifest_file)
from pipeline.shards import stats_path


def read_manifest(data_dir: str | Path) -> dict:
    """The parsed ``manifest.json`` of a dataset folder (the pipeline's and the trainer's reader).

    Raises FileNotFoundError (folder or manifest missing) or DataError, a ValueError (not JSON,
    or not the structure of a manifest: ``pipeline.format.validate_manifest``), each one line.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder not found: {data_dir} (render it with `python -m pipeline render`)")
    path = data_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {data_dir}: not a rendered dataset, or its render did not finish")
    return read_manifest_file(path)


def read_sample(data_dir: str | Path, key: str, manifest: dict | None = None) -> dict:
    """Read one sample from its shard: {"key", "burst" uint8 (F,S,S,3), "target" uint8 (S,S,3), "params"}.

    Shapes are checked against the manifest (read if not given) before decoding; a member that
    is not a regular file or does not decode is a DataError naming the shard and member.
    """
    m = KEY.fullmatch(key)
    if not m:
        raise ValueError(f"bad sample key '{key}' (expected <split>-NNNNNN-NNNNNN)")
    man = manifest if manifest is not None else read_manifest(data_dir)
    F, S = man["frames"], man["size"]
    tar_path = Path(data_dir) / f"{m['split']}-{m['shard']}.tar"
    if not tar_path.is_file():
        raise FileNotFoundError(f"{tar_path}: no such shard")
    raw = {}
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for name in MEMBERS:
                try:
                    info = tar.getmember(f"{key}.{name}")
                except KeyError:
                    raise KeyError(f"sample {key} is not in {tar_path.name}") from None
                check_member(info, str(tar_path))
                raw[name] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise DataError(f"{tar_path}: unreadable tar ({type(e).__name__}: {e})") from None
    where = f"{tar_path}: sample {key}"
    return {"key": key,
            "burst": decode_npy(raw["burst.npy"], f"{where}: burst.npy", (F, S, S, 3), np.uint8),
            "target": decode_png(raw["target.png"], f"{where}: target.png", (S, S)),
            "params": decode_json(raw["json"], f"{where}: json")}


def _quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    q = np.quantile(np.asarray(values), [0.0, 0.1, 0.5, 0.9, 1.0])
    return "  ".join(f"{v:.3g}" for v in q)


def summary(data_dir: str | Path) -> str:
    """Splits, shards, samples, bytes, config hash, distributions of blur size and noise level."""
    man = read_manifest(data_dir)
    lines = [f"dataset {man['name']}  config {man['config_hash']}  code {man['code_version']}  "
             f"seed {man['seed']}",
             f"{man['frames']} frames of {man['size']}x{man['size']}, kernels {man['kernel_size']}x{man['kernel_size']}",
             f"{'split':<8}{'source':<22}{'shards':>7}{'samples':>9}{'MB':>9}  skipped inputs"]
    blur, noise = [], []
    for split, s in man["splits"].items():
        size = sum(sh["bytes"] for sh in s["shards"]) / 1e6
        skipped = ", ".join(f"{v['count']} {r}" for r, v in s["skipped"].items()) or "none"
        lines.append(f"{split:<8}{s['source'][:21]:<22}{len(s['shards']):>7}{s['samples']:>9}{size:>9.1f}  {skipped}")
        for i, _ in enumerate(s["shards"]):
            st = json.loads(stats_path(data_dir, split, i).read_text())
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


def contact_sheet(data_dir: str | Path, split: str | None = None, index: int | None = None,
                  key: str | None = None, out: str | Path | None = None) -> Path:
    """Write target | every frame, with every kernel enlarged beneath, and a caption."""
    man = read_manifest(data_dir)
    if key is None:
        split = split or next(iter(man["splits"]))
        if split not in man["splits"]:
            raise KeyError(f"no split '{split}' in {data_dir} (splits: {', '.join(man['splits'])})")
        per_shard = man["config"]["splits"][split]["samples_per_shard"]
        n = man["splits"][split]["samples"]
        if index is None or not 0 <= index < n:
            raise IndexError(f"index {index} out of range for split '{split}' ({n} samples)")
        key = f"{split}-{index // per_shard:06d}-{index:06d}"
    sample = read_sample(data_dir, key, man)
    params = sample["params"]
    split = key.split("-")[0]
    kernels = zarr.open_group(str(Path(data_dir) / man["kernels"]), mode="r")[split]
    row = params.get("kernel_row")
    if type(row) is not int or not 0 <= row < kernels.shape[0]:
        raise DataError(f"sample {key}: json kernel_row {row!r} is not a row of {man['kernels']}/{split}")
    kern = np.asarray(kernels[row])
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
    out = Path(out) if out else Path(data_dir) / f"{key}.png"
    tmp = out.with_name(f".{out.name}.tmp")
    sheet.save(tmp, format="png")
    tmp.replace(out)
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
    data_dir = Path(data_dir)
    man = read_manifest(data_dir)
    errors, warnings = [], []
    for s in man["splits"].values():
        for entry in s["shards"]:
            problem = check_shard(data_dir, man, entry)
            if problem:
                errors.append(problem)
    checked = "kernel_files" in man
    if checked:
        errors += check_tree(data_dir / man["kernels"], man["kernel_files"], man["kernels"])
    else:
        warnings.append(f"{man['kernels']}: not checked: this manifest (from an older pipeline) records no "
                        "checksums of its files; render the dataset again to record them")
    stray_errors, stray_warnings = stray_files(data_dir, man)
    return Report(errors + stray_errors, warnings + stray_warnings, checked)


def verify(data_dir: str | Path) -> str | None:
    """Check every shard, kernels.zarr and the folder against the manifest (``check_dataset``).
    Returns None when all is well, else the first error line."""
    report = check_dataset(data_dir)
    return report.errors[0] if report.errors else None


def check_shard(data_dir: Path, man: dict, entry: dict) -> str | None:
    """One shard against its manifest entry: size, sha256, then every member (a regular file, of
    this shard's keys, decoded with the declared shapes) and the sample count. None if all is
    well, else a one-line description of its first problem."""
    F, S = man["frames"], man["size"]
    file = entry["file"]
    stem = file[:-len(".tar")]
    split, shard = stem.rsplit("-", 1)
    per_shard = man["config"]["splits"][split]["samples_per_shard"]
    start = int(shard) * per_shard
    path = data_dir / file
    if not path.is_file():
        return f"{file}: missing"
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        return f"{file}: {len(data)} bytes, manifest says {entry['bytes']}"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return f"{file}: sha256 differs from the manifest"
    samples: dict[str, set] = {}
    seen = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                check_member(member, file)
                if member.name in seen:
                    return f"{file}: {member.name} appears twice"
                seen.add(member.name)
                key, _, ext = member.name.partition(".")
                m = KEY.fullmatch(key)
                if not m or f"{m['split']}-{m['shard']}" != stem:
                    return f"{file}: {member.name} is not a member of this shard (keys {stem}-NNNNNN)"
                if not start <= int(m["index"]) < start + entry["samples"]:
                    return f"{file}: {member.name}: index outside this shard's samples {start}..{start + entry['samples'] - 1}"
                samples.setdefault(key, set()).add(ext)
                raw = tar.extractfile(member).read()
                where = f"{file}: sample {key}: {ext}"
                if ext == "burst.npy":
                    decode_npy(raw, where, (F, S, S, 3), np.uint8)
                elif ext == "target.png":
                    decode_png(raw, where, (S, S))
                elif ext == "json":
                    decode_json(raw, where)
    except DataError as e:
        return str(e)
    except (tarfile.TarError, ValueError, OSError, EOFError) as e:
        return f"{file}: unreadable ({type(e).__name__}: {e})"
    if len(samples) != entry["samples"]:
        return f"{file}: {len(samples)} samples, manifest says {entry['samples']}"
    for key, exts in samples.items():
        if exts != set(MEMBERS):
            return f"{file}: sample {key} has members {sorted(exts)}"
    return None


def stray_files(data_dir: Path, man: dict) -> tuple[list[str], list[str]]:
    """Files in the dataset folder that the manifest does not account for, one line each, as
    (errors, warnings). Errors: temporary files of unfinished writes (ours, zarr's), the plan file
    of an unfinished render, tars the manifest does not list; a finished dataset holds none.
    Warnings: any other file (a contact sheet written into the folder, notes). The render lock
    (``.render.lock``) is ignored; files inside kernels.zarr are ``check_tree``'s."""
    listed = {MANIFEST, LOCK}
    for s in man["splits"].values():
        for e in s["shards"]:
            listed |= {e["file"], f"{STATS_DIR}/{e['file'][:-len('.tar')]}.json"}
    errors, warnings = [], []
    kernels = man["kernels"]
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
