"""imaging: one synthetic image per case, expectations computed independently."""
import os
import time

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from oncolake import imaging, isolation
from tests.hostile import jpeg_frame_taller, jpeg_garbled_scan, jpeg_repeated_scans, png_with_header

LIMITS = {"max_pixels": 10_000_000, "min_side": 8}


def encode(array: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, array)
    assert ok
    return buf.tobytes()


def rgb_image(h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext,fmt", [(".jpg", "jpeg"), (".png", "png"), (".bmp", "bmp"), (".tif", "tiff")])
def test_valid_rgb_in_each_format(ext, fmt):
    result = imaging.inspect(encode(rgb_image(), ext), **LIMITS)
    assert result.ok, result
    assert (result.format, result.width, result.height, result.channels) == (fmt, 64, 48, 3)


def test_grayscale_rgba_and_16_bit_png_are_valid_with_their_channels():
    gray = imaging.inspect(encode(rgb_image()[..., 0], ".png"), **LIMITS)
    rgba = imaging.inspect(encode(np.dstack([rgb_image(), rgb_image(seed=1)[..., :1]]), ".png"), **LIMITS)
    deep = imaging.inspect(encode(rgb_image().astype(np.uint16) * 257, ".png"), **LIMITS)
    assert (gray.ok, gray.channels, gray.bit_depth) == (True, 1, 8)
    assert (rgba.ok, rgba.channels) == (True, 4)
    assert (deep.ok, deep.channels, deep.bit_depth) == (True, 3, 16)


def test_cmyk_jpeg_is_valid_with_four_channels(tmp_path):
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(tmp_path / "c.jpg")
    result = imaging.inspect((tmp_path / "c.jpg").read_bytes(), **LIMITS)
    assert (result.ok, result.format, result.channels, result.width) == (True, "jpeg", 4, 40)
    assert imaging.decode_rgb((tmp_path / "c.jpg").read_bytes()).shape == (30, 40, 3)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".tif"])
def test_truncated_files_are_caught(ext):
    data = encode(rgb_image(), ext)
    result = imaging.inspect(data[: len(data) // 2], **LIMITS)
    assert (result.ok, result.reason) == (False, "truncated"), result


@pytest.mark.parametrize("fraction", [0.3, 0.8, 0.99])
def test_truncated_jpeg_is_caught_from_its_structure_not_the_decoder(fraction):
    # Some OpenCV/libjpeg builds fill a truncated JPEG with grey and only warn;
    # the verdict must not depend on which one is installed.
    data = encode(rgb_image(256, 256), ".jpg")
    cut = data[: int(len(data) * fraction)]
    assert imaging.read_header(data).width == 256
    with pytest.raises(imaging.ImageError, match="end-of-image"):
        imaging.read_header(cut)
    assert imaging.inspect(cut, **LIMITS).reason == "truncated"


def test_decompression_bomb_is_refused_from_the_header_without_decoding():
    result = imaging.inspect(png_with_header(100_000, 100_000), **LIMITS)
    assert (result.ok, result.reason) == (False, "too_large")
    assert "100000x100000" in result.detail


def test_empty_text_random_and_unsupported():
    assert imaging.inspect(b"", **LIMITS).reason == "empty"
    assert imaging.inspect(b"path,label\nx.png,benign\n", **LIMITS).reason == "unsupported_format"
    assert imaging.inspect(np.random.default_rng(3).bytes(4000), **LIMITS).reason == "corrupt"
    assert imaging.inspect(b"GIF89a" + b"\x00" * 100, **LIMITS).reason == "unsupported_format"


def test_corrupted_png_byte_fails_crc():
    data = bytearray(encode(rgb_image(), ".png"))
    data[60] ^= 0xFF
    assert imaging.inspect(bytes(data), **LIMITS).reason == "corrupt"


def test_too_small():
    assert imaging.inspect(encode(rgb_image(4, 4), ".png"), **LIMITS).reason == "too_small"


@pytest.mark.parametrize("policy", imaging.RESIZE_POLICIES)
def test_prepare_shape_and_type(policy):
    out = imaging.prepare(encode(rgb_image(30, 90), ".png"), 32, policy)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_prepare_is_rgb_and_matches_an_independent_resize():
    image = rgb_image(64, 64)
    expected = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)[..., ::-1]  # BGR in, RGB out
    np.testing.assert_array_equal(imaging.prepare(encode(image, ".png"), 32, "stretch"), expected)


def test_crop_keeps_the_centre_and_pad_adds_black_bars():
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, 20:40] = 255  # a white centre square between black sides
    cropped = imaging.resize(image, 20, "crop")
    padded = imaging.resize(image, 60, "pad")
    assert cropped.min() == 255
    assert padded[:20].max() == 0 and padded[-20:].max() == 0 and padded[30, 30].min() == 255


def test_pad_of_a_very_long_image_never_builds_the_square_canvas():
    long = np.full((8, 65_535, 3), 200, np.uint8)  # a valid TIFF's shape the fuzz test found
    start = time.perf_counter()
    padded = imaging.resize(long, 32, "pad")
    assert time.perf_counter() - start < 1.0  # padding first meant a 65,535 x 65,535 x 3 canvas (12.9 GB)
    assert padded.shape == (32, 32, 3)
    assert padded[15].min() == 200 and padded[:15].max() == 0 and padded[16:].max() == 0  # one row, centred


def test_shades_of_grey_makes_a_uniform_colour_grey_of_its_rms_and_leaves_grey_alone():
    uniform = np.empty((4, 5, 3), np.uint8)
    uniform[...] = (200, 100, 50)
    # the light is the colour itself; neutral grey of the same length is its root mean square
    rms = round(((200 ** 2 + 100 ** 2 + 50 ** 2) / 3) ** 0.5)  # 132
    for p in (1, 6):
        assert (imaging.colour_constancy(uniform, p) == rms).all()
    grey = np.random.default_rng(0).integers(0, 256, (16, 16, 1), np.uint8).repeat(3, axis=2)
    np.testing.assert_array_equal(imaging.colour_constancy(grey, 6), grey)
    black = np.zeros((3, 3, 3), np.uint8)
    np.testing.assert_array_equal(imaging.colour_constancy(black, 6), black)
    with pytest.raises(ValueError, match="at least 1"):
        imaging.colour_constancy(uniform, 0)


def test_shades_of_grey_takes_the_same_scene_under_two_lights_to_the_same_tensor():
    """A colour cast is a gain per channel; the Minkowski norm scales with it, so the
    correction undoes it: the scene lit white and lit warm come out within rounding."""
    scene = photo_like(48, 64, seed=3).astype(np.float64) * 0.75  # headroom: the cast must not clip
    warm = np.rint(scene * (1.25, 1.0, 0.7)).astype(np.uint8)
    white = np.rint(scene).astype(np.uint8)
    assert np.abs(warm.astype(int) - white).mean() > 10  # the cast is visible before
    a, b = imaging.colour_constancy(white, 6), imaging.colour_constancy(warm, 6)
    assert np.abs(a.astype(int) - b).max() <= 2 and np.abs(a.astype(int) - b).mean() < 0.6
    # and prepare applies it after the resize, from stored bytes
    stored = encode(warm[..., ::-1], ".png")  # cv2 writes BGR
    np.testing.assert_array_equal(imaging.prepare(stored, 32, "stretch", shades_of_grey=6),
                                  imaging.colour_constancy(imaging.prepare(stored, 32, "stretch"), 6))


def test_exif_orientation_is_applied(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(wide).save(tmp_path / "o.jpg", exif=exif)
    assert imaging.decode_rgb((tmp_path / "o.jpg").read_bytes()).shape == (40, 20, 3)


def test_bad_policy_is_a_value_error():
    with pytest.raises(ValueError, match="resize policy"):
        imaging.resize(rgb_image(), 8, "squash")


def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth structure plus fine noise, like a dermoscopy photograph (random noise alone is not)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(xx / (w / 7) + c) * np.cos(yy / (h / 5) - c) for c in (0.0, 1.0, 2.0)], -1)
    cv2.circle(base, (w // 2, h // 2), min(h, w) // 4, (40, 20, 60), -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("width,height,size,policy,factor", [
    (4000, 3000, 224, "stretch", 8), (4000, 3000, 224, "crop", 8), (1000, 900, 224, "stretch", 4),
    (600, 450, 224, "stretch", 2), (600, 450, 128, "stretch", 2), (600, 450, 112, "stretch", 4),
    (300, 200, 224, "stretch", 1), (3000, 300, 224, "pad", 8), (3000, 300, 224, "stretch", 1)])
def test_reduction_leaves_at_least_the_target_side(width, height, size, policy, factor):
    assert imaging.reduction(width, height, size, policy) == factor


@pytest.mark.parametrize("policy", imaging.RESIZE_POLICIES)
def test_large_jpeg_decodes_at_reduced_scale_within_two_grey_levels(policy):
    data = encode(photo_like(1500, 2000), ".jpg")
    reduced, full = imaging.prepare(data, 128, policy), imaging.prepare(data, 128, policy, reduced=False)
    # independently: libjpeg's 1/8 DCT scaling (1500 // 8 >= 128), then the same area resize
    small = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_8), cv2.COLOR_BGR2RGB)
    assert small.shape == (188, 250, 3)
    np.testing.assert_array_equal(reduced, imaging.resize(small, 128, policy))
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() <= 2.0
    # PNG has no DCT scaling: it is decoded whole either way, so both paths agree exactly
    png = encode(photo_like(600, 800), ".png")
    np.testing.assert_array_equal(imaging.prepare(png, 128, policy), imaging.prepare(png, 128, policy, reduced=False))


def test_reduced_decoding_keeps_exif_orientation(tmp_path):
    wide = photo_like(600, 1200)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(tmp_path / "o.jpg", exif=exif, quality=90)
    data = (tmp_path / "o.jpg").read_bytes()
    assert imaging.decode_rgb(data, 64).shape == (150, 75, 3)  # 1/8 of 1200 x 600, turned upright
    full = imaging.prepare(data, 64, reduced=False)
    assert np.abs(imaging.prepare(data, 64).astype(int) - full.astype(int)).mean() <= 2.0


def test_large_jpeg_validated_at_reduced_scale_keeps_full_size_facts_and_catches_truncation():
    data = encode(photo_like(1500, 2000, seed=3), ".jpg")
    result = imaging.inspect(data, **LIMITS)
    assert (result.ok, result.width, result.height, result.channels, result.bit_depth) == (True, 2000, 1500, 3, 8)
    assert imaging.inspect(data[: len(data) * 2 // 3], **LIMITS).reason == "truncated"


def _strict_full_decode_ok(data: bytes, shape: tuple[int, int]) -> bool:
    """libjpeg-turbo at full size, every warning an error: the verdict validation must give."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True).shape[:2] == shape
    except ValueError:
        return False


def test_reduced_validation_gives_the_strict_full_size_decodes_verdict_on_corrupted_large_jpegs():
    data = encode(photo_like(1500, 2000, seed=3), ".jpg")
    scan = data.index(b"\xff\xda") + 20
    rng = np.random.default_rng(0)
    opencv_accepted = 0
    for case in range(30):
        broken = bytearray(data)
        where = int(rng.integers(scan, len(data) - 5000))
        if case % 3 == 0:      # scattered bit flips
            for pos in rng.integers(scan, len(data) - 2, 20):
                broken[int(pos)] ^= 1 << int(rng.integers(0, 8))
        elif case % 3 == 1:    # a run of garbage
            broken[where:where + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
        else:                  # bytes lost from the middle
            del broken[where:where + 3000]
        result = imaging.inspect(bytes(broken), **LIMITS)
        assert result.ok == _strict_full_decode_ok(bytes(broken), (1500, 2000)), (case, result)
        assert result.ok or result.reason in imaging.REASONS
        full = cv2.imdecode(np.frombuffer(bytes(broken), np.uint8), cv2.IMREAD_UNCHANGED)
        opencv_accepted += not result.ok and full is not None and full.shape[:2] == (1500, 2000)
    assert opencv_accepted >= 10  # refused here, though OpenCV alone would have decoded them (grey-filled)


def test_jpeg_with_corrupt_scan_data_or_a_frame_taller_than_its_scan_is_corrupt_though_opencv_decodes_it():
    data = encode(photo_like(480, 640, seed=5), ".jpg")
    for bad in (jpeg_garbled_scan(data), jpeg_frame_taller(data, 200)):
        assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV: "fine"
        result = imaging.inspect(bad, **LIMITS)
        assert (result.ok, result.reason) == (False, "corrupt"), result
        assert result.detail.startswith("libjpeg: Corrupt JPEG data")


def test_progressive_jpeg_of_a_thousand_repeated_scans_is_corrupt_and_slow_to_decode():
    hostile = jpeg_repeated_scans(1000)
    start = time.perf_counter()
    assert cv2.imdecode(np.frombuffer(hostile, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8) is not None
    result = imaging.inspect(hostile, **LIMITS)
    assert (result.ok, result.reason) == (False, "corrupt"), result
    assert "progression" in result.detail
    # Each repeat is a full pass over the coefficients: seconds for 38 KB. Ingest's
    # per-file time limit (oncolake.isolation) is what bounds such a file.
    assert time.perf_counter() - start > 0.5


def _slow(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def _die(_: int) -> None:
    os.abort()


def _raise(message: str) -> None:
    raise imaging.ImageError("corrupt", message)


def test_isolated_call_times_out_survives_a_crashed_child_and_goes_on():
    with isolation.Isolated(_slow, 0.5) as slow:
        assert slow(0.0) == "done"
        first = slow._process.pid
        with pytest.raises(isolation.Overrun) as overrun:
            slow(30)
        assert overrun.value.reason == "timeout"
        assert slow(0.0) == "done" and slow._process.pid != first  # a new child took over
        child = slow._process
    child.join(1)
    assert not child.is_alive()  # closing the pipe ends the child at once
    with isolation.Isolated(_die, 5) as dying:
        with pytest.raises(isolation.Overrun) as crashed:
            dying(0)
        assert crashed.value.reason == "decoder_crash" and "SIGABRT" in crashed.value.detail
    with isolation.Isolated(_raise, 5) as raising, pytest.raises(imaging.ImageError, match="bad bytes"):
        raising("bad bytes")
    assert isolation.Isolated(os.getpid, 0)() == os.getpid()  # no limit: in this process
    assert isolation.Isolated(os.getpid, 5)() != os.getpid()
