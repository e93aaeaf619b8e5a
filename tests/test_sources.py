"""Tests of pipeline/sources.py: folder scans, decoding, photo canvases, dead leaves.

Every test image is written with Pillow into tmp_path at test time.
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pipeline import sources
from pipeline.config import SourceConfig
from pipeline.sources import PhotoDecodeError, SourceError, SourceList


@pytest.fixture(autouse=True)
def fresh_caches():
    """The photo cache and remembered failures are per process: isolate tests from each other."""
    sources.clear_caches()
    yield
    sources.clear_caches()


def photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth colourful RGB test image (compresses well, survives JPEG)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.02, 0.1, 3)
    img = np.stack([127 + 120 * np.sin(a[c] * x + (c + 1) * a[c] * y + seed) for c in range(3)], -1)
    return Image.fromarray(img.astype(np.uint8))


def save(path, image: Image.Image, **kw) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **kw)
    return str(path)


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- listing


def test_dir_scan_is_recursive_sorted_and_absolute(tmp_path):
    names = ["z.png", "a/b/c/deep.jpg", "a/m.webp", "B.tif", "a/b/x.png"]
    for i, name in enumerate(names):
        save(tmp_path / name, photo(40, 50, i))
    src = sources.list_source(f"dir:{tmp_path}", 32)
    assert src.kind == "photos" and src.root == str(tmp_path) and src.spec == f"dir:{tmp_path}"
    assert src.paths == tuple(sorted(str(tmp_path / n) for n in names))
    assert all(os.path.isabs(p) for p in src.paths)
    assert src.skipped == {}
    assert src.name(str(tmp_path / "a/b/c/deep.jpg")) == os.path.join("a", "b", "c", "deep.jpg")


def test_dir_scan_survives_symlink_loops_and_counts_dangling_links(tmp_path):
    save(tmp_path / "sub/p.png", photo(40, 40))
    os.symlink(tmp_path, tmp_path / "sub/loop")  # sub/loop -> the root: a cycle
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    src = sources.list_source(f"dir:{tmp_path}", 32)
    assert src.paths == (str(tmp_path / "sub/p.png"),)  # the loop does not list it twice
    assert src.skipped == {"unreadable": [str(tmp_path / "dangling.png")]}


@pytest.mark.parametrize("case", ["missing", "file", "empty", "only_subfolders", "non_images"])
def test_bad_folders_raise_one_line_naming_them(tmp_path, case):
    target = tmp_path / "photos"
    if case == "file":
        target.write_text("not a folder")
    elif case == "empty":
        target.mkdir()
    elif case == "only_subfolders":
        (target / "a" / "b").mkdir(parents=True)
    elif case == "non_images":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
        (target / "data.bin").write_bytes(bytes(range(256)))
    with pytest.raises(SourceError) as err:
        sources.list_source(f"dir:{target}", 32)
    message = str(err.value)
    assert str(target) in message and "\n" not in message
    expected = {"missing": "not found", "file": "is a file", "empty": "empty",
                "only_subfolders": "empty", "non_images": "2 skipped: 2 not an image"}[case]
    assert expected in message


def test_unknown_spec_raises():
    with pytest.raises(SourceError, match="unknown source 'photos:/x'"):
        sources.list_source("photos:/x", 32)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_mixed_folder_lists_good_files_and_counts_the_rest_by_reason(tmp_path, monkeypatch):
    good = [save(tmp_path / "good.jpg", photo(60, 80, 1), quality=90),
            save(tmp_path / "good.png", photo(64, 64, 2)),
            save(tmp_path / "sub/good.webp", photo(50, 70, 3)),
            save(tmp_path / "sub/good.tiff", photo(70, 50, 4))]
    jpeg, png = encoded(photo(60, 80), "JPEG"), encoded(photo(60, 80), "PNG")
    (tmp_path / "cut_header.jpg").write_bytes(jpeg[:12])  # cut inside the header
    (tmp_path / "cut_header.png").write_bytes(png[:20])
    (tmp_path / "readme.txt").write_text("not an image\n")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    small = save(tmp_path / "sub/small.png", photo(20, 200))  # min side 20 < 32
    bomb = save(tmp_path / "bomb.png", photo(100, 100))
    # a decompression bomb, made cheap: lower Pillow's limit for this test only
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    src = sources.list_source(f"dir:{tmp_path}", 32)
    assert src.paths == tuple(sorted(good))
    assert src.skipped == {
        "not an image": sorted(str(tmp_path / n) for n in ["readme.txt", "noise.jpg"]),
        # Pillow knows the format but the header ends early: an OSError, i.e. unreadable
        "unreadable": sorted(str(tmp_path / n) for n in ["cut_header.jpg", "cut_header.png"]),
        "too small": [small],
        "decompression bomb": [bomb],
    }
    assert list(src.skipped) == [r for r in sources.SKIP_REASONS if r in src.skipped]


def test_nothing_usable_names_the_skip_counts(tmp_path):
    save(tmp_path / "a.png", photo(10, 10))
    save(tmp_path / "b.png", photo(12, 300))
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(SourceError) as err:
        sources.list_source(f"dir:{tmp_path}", 32)
    assert f"no usable image in {tmp_path}" in str(err.value)
    assert "3 skipped: 1 not an image, 2 too small (< 32 px)" in str(err.value)


def test_unreadable_file_is_counted(tmp_path, monkeypatch):
    save(tmp_path / "ok.png", photo(40, 40))
    locked = save(tmp_path / "locked.png", photo(40, 40))
    real_open = sources.Image.open

    def open_or_deny(fp, *args, **kwargs):  # as a permission-less file would (root ignores chmod)
        if str(fp) == str(locked):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(sources.Image, "open", open_or_deny)
    src = sources.list_source(f"dir:{tmp_path}", 32)
    assert src.skipped == {"unreadable": [locked]}


def test_samples_are_real_bundled_photographs():
    src = sources.list_source("samples", 210)
    assert src.kind == "photos" and src.root == ""
    assert len(src.paths) >= 5
    # fixed order (SAMPLE_FILES), independent of where the packages are installed
    assert [src.name(p) for p in src.paths] == [os.path.basename(r) for _, r in sources.SAMPLE_FILES]
    expected = {os.path.basename(rel) for _, rel in sources.SAMPLE_FILES}
    for path in src.paths:
        assert os.path.isfile(path) and src.name(path) in expected
    image = sources.load_photo(src.paths[0])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 210
    assert image.std() > 20  # a photograph, not a flat placeholder


def test_deadleaves_source_lists_nothing():
    src = sources.list_source("deadleaves", 210)
    assert src == SourceList(spec="deadleaves", kind="deadleaves", root="", paths=(), skipped={})


# ----------------------------------------------------------------------------- decoding


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40: left half red, right half blue
    img[:, :20, 0] = 255
    img[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = save(tmp_path / "rot.jpg", Image.fromarray(img), exif=exif.tobytes(), quality=95)
    out = sources.load_photo(path)
    assert out.shape == (40, 20, 3)
    # 90 degrees clockwise: the left (red) half ends up on top
    assert out[:15, :, 0].mean() > 200 and out[:15, :, 2].mean() < 50
    assert out[25:, :, 2].mean() > 200 and out[25:, :, 0].mean() < 50
    # the scan's min-side check is the same before and after rotation
    assert sources.list_source(f"dir:{tmp_path}", 20).paths == (path,)


def _mode_images():
    gray = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    rgb = np.asarray(photo(12, 16))
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    rgba = Image.fromarray(np.dstack([rgb, np.full((12, 16), 7, np.uint8)]))
    return {
        "1": (Image.fromarray(gray > 100), "png", np.repeat((gray > 100)[..., None] * 255, 3, 2)),
        "L": (Image.fromarray(gray), "png", np.repeat(gray[..., None], 3, 2)),
        "LA": (Image.fromarray(np.dstack([gray, gray[::-1]]), "LA"), "png", np.repeat(gray[..., None], 3, 2)),
        "P": (palette, "png", np.asarray(palette.convert("RGB"))),
        "RGBA": (rgba, "png", rgb),  # alpha dropped, not composited
        "CMYK": (Image.fromarray(rgb).convert("CMYK"), "tiff", rgb),
    }


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK"])
def test_modes_convert_to_rgb8(tmp_path, mode):
    image, fmt, expected = _mode_images()[mode]
    path = save(tmp_path / f"img.{fmt}", image)
    with Image.open(path) as check:
        assert check.mode == mode  # the file really holds that mode
    out = sources.load_photo(path)
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3) and out.flags.c_contiguous
    # CMYK round trips through Pillow's naive conversion within a level or two
    np.testing.assert_allclose(out.astype(int), expected.astype(int), atol=2 if mode == "CMYK" else 0)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 300], [40000, 65535, 32768, 1000]], dtype=np.uint16)
    path = save(tmp_path / "deep.png", Image.fromarray(values))
    with Image.open(path) as check:
        assert check.mode == "I;16"
    out = sources.load_photo(path)
    assert out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out[..., 0], values >> 8)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # big-endian 16-bit and 32-bit integer modes take the same route
    big = Image.fromarray(values).convert("I")
    np.testing.assert_array_equal(sources.to_rgb8(big)[..., 1], values >> 8)


def test_float_images_are_clipped_to_unit_range():
    values = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0, np.nan]], dtype=np.float32)
    out = sources.to_rgb8(Image.fromarray(values, "F"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 128, 255, 255, 0])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_passes_the_scan_and_fails_the_decode(tmp_path, fmt):
    data = encoded(photo(120, 160), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert sources.probe(str(path), 32) is None  # the header is intact
    with pytest.raises(PhotoDecodeError) as err:
        sources.load_photo(str(path))
    assert str(err.value).startswith(f"{path}: truncated or corrupt (")
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        sources.load_photo(str(tmp_path / "gone.png"))


# ----------------------------------------------------------------------------- photo canvases


def _photo_folder(tmp_path, n_good=3):
    for i in range(n_good):
        save(tmp_path / f"p{i}.png", photo(90 + 10 * i, 120, i))
    return sources.list_source(f"dir:{tmp_path}", 64)


def test_photo_canvas_is_deterministic_and_describes_its_crop(tmp_path):
    src = _photo_folder(tmp_path)
    cfg = SourceConfig(photo_scale_min=0.5, photo_scale_max=1.0)
    draws = []
    for seed in range(12):
        a, info = sources.draw_canvas(np.random.default_rng(seed), src, 64, cfg)
        sources.clear_caches()  # same result from a cold cache
        b, info_b = sources.draw_canvas(np.random.default_rng(seed), src, 64, cfg)
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3) and a.flags.writeable
        assert np.array_equal(a, b) and info == info_b
        json.dumps(info)  # plain JSON types
        assert info["source"] == "photo" and info["decode_failures"] == []
        x0, y0, x1, y1 = info["crop"]
        w, h = info["photo_size"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and x1 - x0 == y1 - y0
        assert info["scale"] == 64 / (x1 - x0) and 0.5 <= info["scale"] <= 1.0
        draws.append((info["path"], tuple(info["crop"])))
    assert len(set(draws)) > 6  # different seeds draw different crops and files
    assert {p for p, _ in draws} == {"p0.png", "p1.png", "p2.png"}


def test_unscaled_crop_is_the_photo_pixels(tmp_path):
    src = _photo_folder(tmp_path)
    image, info = sources.draw_canvas(np.random.default_rng(3), src, 64, SourceConfig())
    x0, y0, x1, y1 = info["crop"]
    full = sources.load_photo(os.path.join(src.root, info["path"]))
    assert np.array_equal(image, full[y0:y1, x0:x1])
    assert info["scale"] == 1.0 and image.flags.writeable


def test_scale_below_one_zooms_out_and_box_fits_small_photos(tmp_path):
    src = _photo_folder(tmp_path)
    cfg = SourceConfig(photo_scale_min=0.25, photo_scale_max=0.25)
    image, info = sources.draw_canvas(np.random.default_rng(0), src, 64, cfg)
    x0, y0, x1, y1 = info["crop"]
    # box 256 does not fit a 90-110 px tall photo: it shrinks to the photo's shorter side
    assert x1 - x0 == min(info["photo_size"]) and image.shape == (64, 64, 3)


def test_decode_failure_is_recorded_and_another_photo_drawn(tmp_path):
    good = save(tmp_path / "good.png", photo(80, 80, 5))
    data = encoded(photo(120, 160), "JPEG")
    for i in range(3):
        (tmp_path / f"cut{i}.jpg").write_bytes(data[: len(data) // 2])
    src = sources.list_source(f"dir:{tmp_path}", 64)
    assert len(src.paths) == 4  # the truncated files pass the header check
    cfg = SourceConfig()
    seen_failure = False
    for seed in range(10):
        image, info = sources.draw_canvas(np.random.default_rng(seed), src, 64, cfg)
        assert info["path"] == "good.png"
        crop = info["crop"]
        assert np.array_equal(image, sources.load_photo(good)[crop[1]:crop[3], crop[0]:crop[2]])
        names = [name for name, _ in info["decode_failures"]]
        assert len(set(names)) == len(names)  # a failed file is not drawn twice
        for name, reason in info["decode_failures"]:
            assert name.startswith("cut") and reason.startswith("truncated or corrupt (")
        seen_failure |= bool(names)
        # the same seed gives the same canvas and failures, whether the failures were cached
        sources.clear_caches()
        again, info_again = sources.draw_canvas(np.random.default_rng(seed), src, 64, cfg)
        assert np.array_equal(image, again) and info == info_again
    assert seen_failure


def test_all_photos_failing_raises_source_error(tmp_path):
    data = encoded(photo(120, 160), "PNG")
    for i in range(2):
        (tmp_path / f"cut{i}.png").write_bytes(data[: len(data) // 2])
    # the scan decodes photos until one succeeds: a folder where none does fails before any work
    with pytest.raises(SourceError, match=r"no image in .* decodes \(2 truncated or corrupt; first: cut0.png\)"):
        sources.list_source(f"dir:{tmp_path}", 64)
    # files that broke after the scan: the worker gives up after trying each of them
    src = sources.SourceList(spec=f"dir:{tmp_path}", kind="photos", root=str(tmp_path),
                             paths=tuple(str(tmp_path / f"cut{i}.png") for i in range(2)))
    with pytest.raises(SourceError, match="could be decoded in 2 tries"):
        sources.draw_canvas(np.random.default_rng(0), src, 64, SourceConfig())


def test_samples_canvas(tmp_path):
    src = sources.list_source("samples", 210)
    cfg = SourceConfig(photo_scale_min=0.5, photo_scale_max=1.0)
    image, info = sources.draw_canvas(np.random.default_rng(0), src, 210, cfg)
    assert image.shape == (210, 210, 3) and image.dtype == np.uint8
    assert info["path"] in {os.path.basename(rel) for _, rel in sources.SAMPLE_FILES}


def test_cache_is_bounded_in_bytes_and_read_only(tmp_path):
    src = _photo_folder(tmp_path)  # decoded: 32.4, 36.0 and 39.6 kB
    sources.clear_caches()
    for path in src.paths:
        sources.cached_photo(path, 0.08)
    assert list(sources._PHOTO_CACHE) == list(src.paths[1:])  # least recently used went first
    assert not sources.cached_photo(src.paths[2], 0.08).flags.writeable
    sources.cached_photo(src.paths[0], 0.001)  # a budget below one photo keeps just the latest
    assert list(sources._PHOTO_CACHE) == [src.paths[0]]
    sources.clear_caches()


# ----------------------------------------------------------------------------- dead leaves


def painter(cx, cy, r, h, w):
    """Reference: paint disks back to front, one at a time."""
    label = np.full((h, w), len(r), np.int32)
    y, x = np.mgrid[0:h, 0:w]
    for i in range(len(r) - 1, -1, -1):
        label[(x - cx[i]) ** 2 + (y - cy[i]) ** 2 <= r[i] ** 2] = i
    return label


@pytest.mark.parametrize("seed", range(3))
def test_first_cover_matches_a_painter(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n, h, w = 300, 37, 53
    r = rng.uniform(0.3, 12, n) ** rng.uniform(0.8, 1.2, n)
    cx, cy = rng.uniform(-10, w + 10, n), rng.uniform(-10, h + 10, n)
    cx[:5], cy[:5] = np.round(cx[:5]), np.round(cy[:5])  # on the pixel grid: boundary cases
    r[:5] = np.round(r[:5]) + 1
    expected = painter(cx, cy, r, h, w)
    assert np.array_equal(sources.first_cover(cx, cy, r, h, w), expected)
    monkeypatch.setattr(sources, "_TABLE_ENTRIES", 400)  # force many row bands
    assert np.array_equal(sources.first_cover(cx, cy, r, h, w), expected)


def test_deadleaves_is_deterministic():
    cfg = SourceConfig()
    a, info_a = sources.deadleaves(np.random.default_rng(7), 210, cfg)
    b, info_b = sources.deadleaves(np.random.default_rng(7), 210, cfg)
    c, _ = sources.deadleaves(np.random.default_rng(8), 210, cfg)
    assert a.dtype == np.uint8 and a.shape == (210, 210, 3) and a.flags.c_contiguous and a.flags.writeable
    assert a.tobytes() == b.tobytes() and info_a == info_b
    assert not np.array_equal(a, c)
    d, info_d = sources.draw_canvas(np.random.default_rng(7), sources.list_source("deadleaves", 0), 210, cfg)
    assert d.tobytes() == a.tobytes() and info_d == info_a
    json.dumps(info_a)


def test_deadleaves_has_detail_at_every_scale():
    full_contrast = SourceConfig(deadleaves_contrast_min=1.0, deadleaves_dof_prob=0.0)
    image, info = sources.deadleaves(np.random.default_rng(0), 210, full_contrast)
    assert info["source"] == "deadleaves" and 1 <= info["disks"] <= SourceConfig().deadleaves_max_disks
    flat = image.reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) > 2000  # many colours (textures, anti-aliased edges)
    assert image.std() > 30
    gray = image.astype(np.float64).mean(axis=2)
    for block in (1, 2, 4, 8):  # edges survive averaging over blocks: structure at all scales
        h = 208 // block * block
        coarse = gray[:h, :h].reshape(h // block, block, h // block, block).mean(axis=(1, 3))
        assert np.abs(np.diff(coarse, axis=1)).mean() > 8
    # the blur anti-aliases: neighbours rarely differ by a full-contrast step
    assert np.abs(np.diff(gray, axis=1)).max() < 255


def test_deadleaves_coverage_stop_and_cap():
    covered = SourceConfig(deadleaves_rmin=20, deadleaves_rmax_frac=1.0, deadleaves_max_disks=4000)
    _, info = sources.deadleaves(np.random.default_rng(0), 64, covered)
    assert info["uncovered_px"] == 0 and 1 <= info["disks"] < 4000  # stopped early, covered
    capped = SourceConfig(deadleaves_max_disks=3, deadleaves_rmax_frac=0.1)
    image, info = sources.deadleaves(np.random.default_rng(0), 64, capped)
    assert info["disks"] == 3 and info["uncovered_px"] > 0
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("slope", [0.5, 1.0, 1.5])
def test_deadleaves_noise_texture_has_a_one_over_f_spectrum(slope):
    """Amplitude ~ 1/f^slope: the radially averaged power falls as f^(-2 slope) (fitted over
    mid frequencies, averaged over images); mean 0.5, std 0.2 before the rare clipping."""
    cfg = SourceConfig(deadleaves_noise_slope_min=slope, deadleaves_noise_slope_max=slope)
    size = 128
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size)))
    power = np.zeros((size, size))
    for seed in range(8):
        texture, _ = sources._noise_fields(np.random.default_rng(seed), size, cfg)
        assert abs(texture.mean() - 0.5) < 0.02 and abs(texture.std() - 0.2) < 0.01
        power += np.abs(np.fft.fft2(texture - texture.mean())) ** 2
    band = np.geomspace(4 / size, 0.4, 12)
    mids = np.sqrt(band[1:] * band[:-1])
    radial = [power[(f >= lo) & (f < hi)].mean() for lo, hi in zip(band[:-1], band[1:])]
    fitted = np.polyfit(np.log(mids), np.log(radial), 1)[0]
    assert fitted == pytest.approx(-2 * slope, abs=0.15)


def test_deadleaves_illumination_is_a_smooth_lognormal_field_of_mean_one():
    cfg = SourceConfig(deadleaves_illumination=0.3)
    _, light = sources._noise_fields(np.random.default_rng(0), 96, cfg)
    assert light.dtype == np.float32 and light.shape == (96, 96)
    assert light.mean() == pytest.approx(1.0, abs=1e-5)
    assert np.log(light).std() == pytest.approx(0.3, abs=1e-4)
    assert np.abs(np.diff(np.log(light), axis=1)).max() < 0.3 * 2 * np.pi * 1.5 * 4 / 96  # at most 1.5 cycles per canvas
    assert sources._noise_fields(np.random.default_rng(0), 96, SourceConfig(deadleaves_illumination=0.0))[1] is None


def test_deadleaves_without_texture_or_blur_is_flat_disks():
    cfg = SourceConfig(deadleaves_texture_prob=0.0, deadleaves_smooth=0.0,
                       deadleaves_rmin=6, deadleaves_max_disks=200, deadleaves_illumination=0.0,
                       deadleaves_dof_prob=0.0, deadleaves_contrast_min=1.0)
    image, info = sources.deadleaves(np.random.default_rng(1), 48, cfg)
    # every pixel has one of the disks' flat colours (or the background)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) <= info["disks"] + 1


@pytest.mark.parametrize("sigma,shape", [  # every pair whose filter fits in the image
    (sigma, shape) for sigma in [0.1, 0.3, 0.7, 1.3, 2.0] for shape in [(3, 50, 40), (3, 5, 4), (2, 7, 3)]
    if len(sources._gaussian_taps(sigma)) - 1 <= min(shape[1:])])
def test_deadleaves_smoothing_is_scipys_gaussian_filter(sigma, shape):
    from scipy import ndimage

    planes = np.random.default_rng(0).random(shape, dtype=np.float32) * 255
    taps = sources._gaussian_taps(sigma)
    # scaled by taps[0] per axis, as deadleaves builds its planes; no filtering below one tap
    out = planes * np.float32(taps[0] ** 2)
    if len(taps) > 1:
        rows = sources._smooth_reflect(out, taps, 2, np.empty_like(out))
        out = sources._smooth_reflect(rows, taps, 1, out=out)
    ref = ndimage.gaussian_filter(planes.astype(np.float64), (0, sigma, sigma), mode="reflect", truncate=3.0)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_bundled_photo_sets_are_disjoint_and_named():
    """The train, val and test sets of bundled photographs are disjoint."""
    sets = {name: sources.list_source(f"samples:{name}", 210) for name in sources.SAMPLE_SETS}
    names = {name: {os.path.basename(p) for p in src.paths} for name, src in sets.items()}
    assert len(names["val"]) >= 4 and len(names["test"]) >= 4
    assert len(names["train"]) >= 4
    for a in names:
        for b in names:
            assert a == b or not names[a] & names[b], (a, b)
    assert sources.list_source("samples", 210).paths == sets["test"].paths
    with pytest.raises(sources.SourceError, match="unknown bundled photo set 'nope'"):
        sources.list_source("samples:nope", 210)


def test_mix_source_draws_components_by_weight(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((80, 90, 3), 40 * i, np.uint8)).save(tmp_path / f"p{i}.png")
    src = sources.list_source(f"mix:3*deadleaves|1*dir:{tmp_path}", 64)
    assert src.kind == "mix" and [w for w, _ in src.parts] == [3.0, 1.0]
    infos = [sources.draw_canvas(np.random.default_rng(i), src, 64, SourceConfig())[1] for i in range(200)]
    photos = sum(info["source"] == "photo" for info in infos)
    assert 30 < photos < 75 and all(info["mix_component"] == (info["source"] == "photo") for info in infos)
    a = sources.draw_canvas(np.random.default_rng(5), src, 64, SourceConfig())
    b = sources.draw_canvas(np.random.default_rng(5), src, 64, SourceConfig())
    np.testing.assert_array_equal(a[0], b[0])
    for bad in ("mix:deadleaves", "mix:0*deadleaves", "mix:x*deadleaves", "mix:1*mix:1*deadleaves"):
        with pytest.raises(sources.SourceError, match="mix component"):
            sources.list_source(bad, 64)
