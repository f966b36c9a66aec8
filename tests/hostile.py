"""Hostile and malformed files, built in a test's folder: what ingest must quarantine, and why.

Each kind is (file name, what it is, expected quarantine reason). The README's
"Hostile input" table lists the same kinds (tests/test_ingest.py checks it).
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

#: ingest settings the folder is built for (the slow image must overrun the limit; small images never do)
SETTINGS = ("ingest.max_file_bytes=4000000", "ingest.decode_timeout_s=0.3")
MAX_FILE_BYTES = 4_000_000


def encode(array: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, array, list(params))
    assert ok
    return buf.tobytes()


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Photograph-like content (JPEG scan data that is neither tiny nor noise)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(xx / (w / 7) + c) * np.cos(yy / (h / 5) - c) for c in (0.0, 1.0, 2.0)], -1)
    return np.clip(base + np.random.default_rng(seed).normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height; its CRCs are valid, its data tiny."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + png_chunk(b"IEND", b""))


def png_claiming(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a PNG) with its IHDR's size replaced, CRC recomputed: header and pixels disagree."""
    body = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", body) + data[33:]


def jpeg_frame_taller(data: bytes, extra_rows: int) -> bytes:
    at = data.index(b"\xff\xc0") + 5
    (height,) = struct.unpack(">H", data[at:at + 2])
    return data[:at] + struct.pack(">H", height + extra_rows) + data[at + 2:]


def jpeg_garbled_scan(data: bytes) -> bytes:
    scan = data.index(b"\xff\xda") + 20
    middle = (scan + len(data)) // 2
    noise = bytes(b & 0x7F for b in np.random.default_rng(1).bytes(40))  # no 0xFF: no false markers
    return data[:middle] + noise + data[middle + 40:]


def jpeg_repeated_scans(times: int) -> bytes:
    """A progressive JPEG whose last scan is repeated: each repeat is a full pass for the decoder."""
    out = io.BytesIO()
    Image.new("RGB", (2000, 2000), (120, 90, 60)).save(out, "JPEG", progressive=True)
    data = out.getvalue()
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last:end] * times + data[end:]


def jpeg_thumbnail_only() -> bytes:
    """An EXIF segment carrying a thumbnail JPEG, and no image of its own."""
    thumb = encode(rgb(16, 16, 3), ".jpg")
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0) + struct.pack("<I", 0) + thumb
    app1 = b"Exif\x00\x00" + tiff
    return b"\xff\xd8" + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + b"\xff\xd9"


def jpeg_bomb() -> bytes:
    """A real small JPEG whose frame header says 60000 x 60000."""
    data = encode(rgb(32, 32, 4), ".jpg")
    at = data.index(b"\xff\xc0") + 5
    return data[:at] + struct.pack(">HH", 60000, 60000) + data[at + 4:]


def bigtiff() -> bytes:
    """A little-endian BigTIFF header (version 43) and one empty IFD."""
    return b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 0) + b"\x00" * 64


def tiff_past_end() -> bytes:
    data = bytearray(encode(rgb(40, 40, 5), ".tif"))
    return bytes(data[: len(data) - 2000])


def slow_png() -> bytes:
    """A valid 49-megapixel 16-bit PNG: 1.5 MB on disk, over a second to decode (past the 0.3 s limit)."""
    y, x = np.mgrid[0:7000, 0:7000]
    g = ((x * 7 + y * 3) % 65536).astype(np.uint16)
    return encode(np.dstack([g, g[::-1], g[:, ::-1]]), ".png", cv2.IMWRITE_PNG_COMPRESSION, 9)


def minimal_pdf() -> bytes:
    return (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(name, data)
    return out.getvalue()


def gif() -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb(30, 30, 6)).save(out, "GIF")
    return out.getvalue()


def jpeg2000() -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb(30, 30, 7)).save(out, "JPEG2000")
    return out.getvalue()


#: (name, what it is, reason): every kind but the file-system ones, whose bytes are made by build()
KINDS: tuple[tuple[str, str, str], ...] = (
    ("empty.jpg", "zero bytes", "empty"),
    ("truncated.jpg", "a JPEG cut in half (no end-of-image marker after its scan)", "truncated"),
    ("truncated.png", "a PNG cut in half (a chunk runs past the end)", "truncated"),
    ("half-copied.tif", "a TIFF whose strips point past the end (a copy still being written)", "truncated"),
    ("random.jpg", "random bytes with an image name", "corrupt"),
    ("zeros.png", "4 KB of zero bytes", "corrupt"),
    ("text.png", "a text file with an image name", "unsupported_format"),
    ("photo.webp.jpg", "a WebP image named .jpg", "unsupported_format"),
    ("animation.png", "a GIF named .png", "unsupported_format"),
    ("scan.jp2.jpg", "a JPEG 2000 image named .jpg", "unsupported_format"),
    ("report.jpg", "a PDF named .jpg", "unsupported_format"),
    ("archive.png", "a ZIP holding a PNG", "unsupported_format"),
    ("compressed.png", "a gzipped PNG", "unsupported_format"),
    ("huge.tif", "a BigTIFF", "unsupported_format"),
    ("bomb.png", "a PNG header claiming 100,000 x 100,000 pixels", "too_large"),
    ("bomb.jpg", "a JPEG frame header claiming 60,000 x 60,000 pixels", "too_large"),
    ("huge.bmp", "a file over ingest.max_file_bytes (never read)", "too_large"),
    ("sparse.jpg", "a 2 GB sparse file (never read)", "too_large"),
    ("tiny.png", "4 x 4 pixels, under ingest.min_side", "too_small"),
    ("zero-width.png", "a PNG header giving 0 x 50 pixels", "corrupt"),
    ("bad-crc.png", "a PNG with one flipped byte (chunk CRC fails)", "corrupt"),
    ("taller.png", "a PNG header two rows taller than its pixel data", "corrupt"),
    ("taller.jpg", "a JPEG frame header 200 rows taller than its scan (OpenCV pads it with grey)", "corrupt"),
    ("garbled.jpg", "40 garbled bytes in a JPEG's scan (OpenCV decodes it)", "corrupt"),
    ("scans.jpg", "a progressive JPEG (38 KB) whose last scan repeats 1,000 times: seconds of decoding", "timeout"),
    ("thumbnail.jpg", "a JPEG holding only an EXIF thumbnail, no image", "corrupt"),
    ("slow.png", "a valid 49-megapixel 16-bit PNG that decodes past ingest.decode_timeout_s", "timeout"),
    ("loop.jpg", "a symbolic link in a loop (loop.jpg -> loop2.jpg -> loop.jpg)", "unreadable"),
)


def build(folder: Path) -> dict[str, str]:
    """Write every kind into ``folder``; returns {relative path: expected reason}."""
    jpeg = encode(smooth(240, 320, 2), ".jpg")
    png = encode(rgb(60, 60, 3), ".png")
    crc = bytearray(encode(rgb(48, 64), ".png"))
    crc[60] ^= 0xFF
    contents = {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "half-copied.tif": tiff_past_end(),
        "random.jpg": np.random.default_rng(11).bytes(3000),
        "zeros.png": bytes(4096),
        "text.png": b"this is not an image\n" * 20,
        "photo.webp.jpg": encode(rgb(30, 30, 8), ".webp"),
        "animation.png": gif(),
        "scan.jp2.jpg": jpeg2000(),
        "report.jpg": minimal_pdf(),
        "archive.png": zipped("inside.png", png),
        "compressed.png": gzip.compress(png),
        "huge.tif": bigtiff(),
        "bomb.png": png_with_header(100_000, 100_000),
        "bomb.jpg": jpeg_bomb(),
        "huge.bmp": encode(rgb(1200, 1200, 12), ".bmp"),
        "tiny.png": encode(rgb(4, 4), ".png"),
        "zero-width.png": png_with_header(0, 50),
        "bad-crc.png": bytes(crc),
        "taller.png": png_claiming(png, 60, 62),
        "taller.jpg": jpeg_frame_taller(jpeg, 200),
        "garbled.jpg": jpeg_garbled_scan(jpeg),
        "scans.jpg": jpeg_repeated_scans(1000),
        "thumbnail.jpg": jpeg_thumbnail_only(),
        "slow.png": slow_png(),
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    with open(folder / "sparse.jpg", "wb") as handle:
        handle.truncate(2 << 30)
    os.symlink("loop2.jpg", folder / "loop.jpg")
    os.symlink("loop.jpg", folder / "loop2.jpg")
    expected = {name: reason for name, _, reason in KINDS}
    # the second link of the loop is the same kind, under its own name
    expected["loop2.jpg"] = "unreadable"
    return expected
