"""Property-based fuzzing of the validator and of ``imaging.prepare`` (hypothesis).

Real images (one of each data set here, when ../shared/data is present) and
synthetic ones in every format ingest takes are mutated: bit flips, cuts,
overwritten or repeated runs of bytes, and header fields (JPEG frame, PNG
IHDR with its CRC fixed, BMP and TIFF sizes) set to arbitrary values. Every
case must end as a valid tensor or a reason from the fixed list: never an
exception, a crash or a hang. Each case runs in the child process ingest
uses (:mod:`oncolake.isolation`), so a crash or a hang fails the test with
the case that caused it instead of killing pytest.
"""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from oncolake import imaging, isolation
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.fuzz

CASES = 10_000
LIMITS = {"max_pixels": 50_000_000, "min_side": 8}
#: a case that takes longer than this is a hang
HANG_S = 20


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(xx / (w / 5) + c) * np.cos(yy / (h / 3) - c) for c in (0.0, 1.0, 2.0)], -1)
    return np.clip(base + np.random.default_rng(seed).normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def _seeds() -> list[bytes]:
    image = _smooth(72, 96, 0)
    seeds = [cv2.imencode(ext, image)[1].tobytes() for ext in (".jpg", ".png", ".bmp", ".tif")]
    seeds.append(cv2.imencode(".png", image.astype(np.uint16) * 257)[1].tobytes())
    for mode, kwargs in (("RGB", {"progressive": True}), ("CMYK", {}), ("L", {})):
        out = io.BytesIO()
        Image.fromarray(image).convert(mode).save(out, "JPEG", **kwargs)
        seeds.append(out.getvalue())
    for name, pattern in (("ham10000", "*.jpg"), ("isic_uda1", "*.jpg"), ("busi", "*.png")):
        real = sorted((SHARED_DATA / name).rglob(pattern))
        if real:  # a real photograph, shrunk so that 10,000 cases stay quick
            data = cv2.imdecode(np.fromfile(str(real[0]), np.uint8), cv2.IMREAD_COLOR)
            small = cv2.resize(data, (data.shape[1] // 4, data.shape[0] // 4), interpolation=cv2.INTER_AREA)
            seeds.append(cv2.imencode(pattern[1:], small)[1].tobytes())
    return seeds


SEEDS = _seeds()


def _set_size(data: bytes, width: int, height: int) -> bytes:
    """The image with the size in its header replaced (checksums kept valid where the format has them)."""
    try:
        return _replace_size(data, width, height)
    except (struct.error, IndexError):  # an earlier mutation broke the header this looks for
        return data


def _signed(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def _replace_size(data: bytes, width: int, height: int) -> bytes:
    fmt = imaging.sniff(data)
    if fmt == "jpeg":
        at = next((i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2)), None)
        if at is None:
            return data
        return data[:at + 5] + struct.pack(">HH", height & 0xFFFF, width & 0xFFFF) + data[at + 9:]
    if fmt == "png":
        body = struct.pack(">II", width, height) + data[24:29]
        return data[:16] + body + struct.pack(">I", zlib.crc32(b"IHDR" + body)) + data[33:]
    if fmt == "bmp":
        return data[:18] + struct.pack("<ii", _signed(width), _signed(height)) + data[26:]
    if fmt == "tiff":  # every ImageWidth / ImageLength entry of the first IFD, whatever its type
        out = bytearray(data)
        order = "<" if data[:2] == b"II" else ">"
        (ifd,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
        for i in range(count):
            at = ifd + 2 + 12 * i
            tag, kind = struct.unpack(order + "HH", data[at:at + 4])
            if tag in (256, 257) and kind in (3, 4):
                value = width if tag == 256 else height
                out[at + 8:at + 12] = (struct.pack(order + "HH", value & 0xFFFF, 0) if kind == 3
                                       else struct.pack(order + "I", value))
        return bytes(out)
    return data


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "overwrite", "repeat", "size"]))
        if not data:
            break
        if kind == "flip":
            for _ in range(draw(st.integers(1, 16))):
                at = draw(st.integers(0, len(data) - 1))
                data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            at = draw(st.integers(0, len(data)))
            data = data[:at] if draw(st.booleans()) else data[:at] + data[at + draw(st.integers(1, 4096)):]
        elif kind == "overwrite":
            at = draw(st.integers(0, len(data) - 1))
            data[at:at + 64] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "repeat":
            at = draw(st.integers(0, len(data) - 1))
            run = bytes(data[at:at + draw(st.integers(1, 2048))])
            data[at:at] = run * draw(st.integers(1, 8))
        else:
            side = st.one_of(st.integers(0, 70_000), st.sampled_from([0, 1, 7, 8, 65_535, 2 ** 31 - 1, 2 ** 32 - 1]))
            data = bytearray(_set_size(bytes(data), draw(side), draw(side)))
    return bytes(data)


def _verdict(data: bytes) -> tuple:
    """What ingest and preprocess make of the bytes (run in the isolated child)."""
    result = imaging.inspect(data, **LIMITS)
    if not result.ok:
        return "refused", result.reason, result.detail
    tensor = imaging.prepare(data, 32, "pad")  # a validated image must always become a tensor
    return "valid", tensor.shape, str(tensor.dtype), (result.width, result.height)


@pytest.fixture(scope="module")
def isolated():
    with isolation.Isolated(_verdict, HANG_S) as call:
        yield call


def test_seeds_are_valid_images(isolated):
    assert len(SEEDS) >= 8
    for data in SEEDS:
        assert isolated(data)[0] == "valid"


@settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_mutated_images_end_as_a_tensor_or_a_reason(isolated, data):
    outcome = isolated(data)  # a crash or a hang raises isolation.Overrun here
    if outcome[0] == "valid":
        assert outcome[1:3] == ((32, 32, 3), "uint8")
        width, height = outcome[3]
        assert width * height <= LIMITS["max_pixels"] and min(width, height) >= LIMITS["min_side"]
    else:
        assert outcome[1] in imaging.REASONS and outcome[2], outcome
