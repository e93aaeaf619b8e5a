"""Look at a rendered dataset: a summary, a contact sheet of one sample, a check of every shard."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import zarr
from PIL import Image, ImageDraw

from pipeline.shards import KERNELS, stats_path

KEY = re.compile(r"(?P<split>[a-z0-9_]+)-(?P<shard>\d{6})-(?P<index>\d{6})")
MEMBERS = ("burst.npy", "json", "target.png")


def read_manifest(data_dir: str | Path) -> dict:
    """The parsed ``manifest.json`` of a dataset folder (the pipeline's and the trainer's reader).

    Raises FileNotFoundError (folder or manifest missing) or ValueError (not a manifest), each
    with a one-line message.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder not found: {data_dir} (render it with `python -m pipeline render`)")
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {data_dir}: not a rendered dataset, or its render did not finish")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{path}: no 'splits' table; not a dataset manifest")
    return manifest


def read_sample(data_dir: str | Path, key: str) -> dict:
    """Read one sample from its shard: {"key", "burst" uint8 (F,S,S,3), "target" uint8 (S,S,3), "params"}."""
    m = KEY.fullmatch(key)
    if not m:
        raise ValueError(f"bad sample key '{key}' (expected <split>-NNNNNN-NNNNNN)")
    tar_path = Path(data_dir) / f"{m['split']}-{m['shard']}.tar"
    if not tar_path.is_file():
        raise FileNotFoundError(f"{tar_path}: no such shard")
    with tarfile.open(tar_path) as tar:
        try:
            raw = {name: tar.extractfile(f"{key}.{name}").read() for name in MEMBERS}
        except KeyError:
            raise KeyError(f"sample {key} is not in {tar_path.name}") from None
    return {"key": key,
            "burst": np.load(io.BytesIO(raw["burst.npy"]), allow_pickle=False),
            "target": np.asarray(Image.open(io.BytesIO(raw["target.png"])).convert("RGB")),
            "params": json.loads(raw["json"])}


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
    sample = read_sample(data_dir, key)
    params = sample["params"]
    kern = np.asarray(zarr.open_group(str(Path(data_dir) / KERNELS), mode="r")[params["split"]][params["kernel_row"]])
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


def verify(data_dir: str | Path) -> str | None:
    """Check every shard against the manifest: sha256, size, sample count, readable members with the
    declared shapes. Returns None when all is well, else a one-line description of the first bad shard."""
    man = read_manifest(data_dir)
    F, S = man["frames"], man["size"]
    for split, s in man["splits"].items():
        for entry in s["shards"]:
            path = Path(data_dir) / entry["file"]
            if not path.is_file():
                return f"{entry['file']}: missing"
            data = path.read_bytes()
            if len(data) != entry["bytes"]:
                return f"{entry['file']}: {len(data)} bytes, manifest says {entry['bytes']}"
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                return f"{entry['file']}: sha256 differs from the manifest"
            try:
                samples: dict[str, set] = {}
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    for member in tar:
                        key, _, ext = member.name.partition(".")
                        samples.setdefault(key, set()).add(ext)
                        raw = tar.extractfile(member).read()
                        if ext == "burst.npy":
                            arr = np.load(io.BytesIO(raw), allow_pickle=False)
                            if arr.dtype != np.uint8 or arr.shape != (F, S, S, 3):
                                return f"{entry['file']}: {member.name} is {arr.dtype} {arr.shape}"
                        elif ext == "target.png":
                            img = Image.open(io.BytesIO(raw))
                            img.load()
                            if img.size != (S, S) or img.mode != "RGB":
                                return f"{entry['file']}: {member.name} is {img.mode} {img.size}"
                        elif ext == "json":
                            json.loads(raw)
            except (tarfile.TarError, ValueError, OSError) as e:
                return f"{entry['file']}: unreadable ({type(e).__name__}: {e})"
            if len(samples) != entry["samples"]:
                return f"{entry['file']}: {len(samples)} samples, manifest says {entry['samples']}"
            for key, exts in samples.items():
                if exts != set(MEMBERS):
                    return f"{entry['file']}: sample {key} has members {sorted(exts)}"
    return None
