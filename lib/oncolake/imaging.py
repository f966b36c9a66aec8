"""Pure image code: sniff, validate, decode and resize. No Spark here.

Validation reads the container structure before decoding anything, for two
reasons a decoder alone cannot cover: a header claiming 100000 x 100000
pixels must be refused before a decoder allocates for it, and OpenCV decodes a
truncated JPEG "successfully" (grey fill, a warning on stderr only), so a JPEG
counts as complete only if an end-of-image marker follows its first scan.
OpenCV also swallows libjpeg's warnings, so corrupt entropy-coded data or a
frame taller than its scan decodes "fine" (padded with grey); 8-bit JPEGs are
therefore validated by libjpeg-turbo through simplejpeg with every warning an
error.

:func:`prepare` is the one transform from stored bytes to a model tensor; the
preprocess and scoring jobs both call it, so training and serving agree.
DICOM files are validated and decoded by :mod:`oncolake.dicom`; here they
become the same 8-bit RGB tensors as every other image, with the
mammography steps (right-side views mirrored, crop to the breast) for MG.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import struct
import zlib

import cv2
import numpy as np
import simplejpeg

from oncolake import isolation
from oncolake.dicom import read as dicom_read
from oncolake.errors import ImageError

#: Quarantine reasons, a fixed list (docs/operations.md explains each).
REASONS = ("empty", "unreadable", "corrupt", "truncated", "unsupported_format", "too_large", "too_small",
           *isolation.REASONS, *dicom_read.REASONS)
RESIZE_POLICIES = ("stretch", "crop", "pad")
SUPPORTED_FORMATS = ("jpeg", "png", "bmp", "tiff", "dicom")
#: DICOM pixels are shrunk to this many times the model's side before any
#: other step (crop, resize): enough detail for the crop, little memory.
DICOM_WORKING_SCALE = 8

_UNSUPPORTED_MAGIC = (
    (b"GIF87a", "gif"), (b"GIF89a", "gif"), (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"), (b"%PDF", "pdf"), (b"PK\x03\x04", "zip"),
    (b"\x1f\x8b", "gzip"), (b"II+\x00", "bigtiff"), (b"MM\x00+", "bigtiff"),
)
# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_REDUCED_COLOR = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
#: Validation decodes 8-bit JPEGs at 1/8 scale (:func:`_strict_jpeg`).
_VALIDATION_REDUCTION = 8
#: simplejpeg's output colour space for a JPEG of this many components.
_STRICT_JPEG = {1: "GRAY", 3: "GRAY", 4: "CMYK"}


@dataclasses.dataclass(frozen=True)
class Header:
    """What the container says about the image, read without decoding pixels."""

    format: str
    width: int
    height: int
    channels: int | None
    bit_depth: int | None


@dataclasses.dataclass(frozen=True)
class Inspection:
    """Outcome of :func:`inspect`: either a valid image's facts or a reason."""

    ok: bool
    format: str | None = None
    width: int | None = None
    height: int | None = None
    channels: int | None = None
    bit_depth: int | None = None
    reason: str | None = None
    detail: str | None = None


def sniff(data: bytes) -> str | None:
    """The container format from the leading bytes, or None if not an image we know."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, name in _UNSUPPORTED_MAGIC:
        if data.startswith(magic):
            return name
    return None


def read_header(data: bytes) -> Header:
    """Parse the container header and check the file is structurally complete.

    Raises :class:`ImageError` (unsupported_format, truncated or corrupt).
    """
    fmt = sniff(data)
    if fmt is None:
        if _looks_like_text(data[:4096]):
            raise ImageError("unsupported_format", "a text file, not an image")
        raise ImageError("corrupt", "no known image signature in the leading bytes")
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError("unsupported_format", f"{fmt} images are not supported")
    if fmt == "dicom":
        raise ValueError("DICOM headers are read by oncolake.dicom.read, not read_header")
    try:
        return {"jpeg": _jpeg_header, "png": _png_header, "bmp": _bmp_header, "tiff": _tiff_header}[fmt](data)
    except (struct.error, IndexError) as err:
        raise ImageError("truncated", f"{fmt} header ends early ({err})") from err


def inspect(data: bytes, max_pixels: int, min_side: int) -> Inspection:
    """Validate one file's bytes completely: header, size limits, then a full decode.

    Never raises for bad data: the reason comes back in the result.
    """
    if not data:
        return Inspection(False, reason="empty", detail="the file has no bytes")
    if dicom_read.is_dicom(data):
        return _inspect_dicom(data, max_pixels, min_side)
    try:
        header = read_header(data)
        if header.width <= 0 or header.height <= 0:
            raise ImageError("corrupt", f"header gives {header.width}x{header.height} pixels")
        pixels = header.width * header.height
        if pixels > max_pixels:
            raise ImageError("too_large", f"{header.width}x{header.height} = {pixels} pixels "
                                          f"exceeds the limit of {max_pixels}")
        if min(header.width, header.height) < min_side:
            raise ImageError("too_small", f"{header.width}x{header.height} is below "
                                          f"the minimum side of {min_side}")
        strict = header.format == "jpeg" and header.bit_depth == 8 and header.channels in _STRICT_JPEG
        factor = _VALIDATION_REDUCTION if strict else 1
        if strict:
            array = _strict_jpeg(data, header.channels)
        else:
            array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ImageError("corrupt", f"the {header.format} decoder could not read the pixels")
        expected = (-(-header.height // factor), -(-header.width // factor))  # libjpeg rounds up
        if array.shape[:2] != expected:
            scale = f" at 1/{factor} scale" if factor > 1 else ""
            raise ImageError("corrupt", f"decoded {array.shape[1]}x{array.shape[0]}{scale} but the "
                                        f"header says {header.width}x{header.height}")
    except ImageError as err:
        return Inspection(False, reason=err.reason, detail=err.detail)
    except cv2.error as err:
        return Inspection(False, reason="corrupt", detail=f"decoder error: {str(err).strip()[:200]}")
    channels = header.channels or (1 if array.ndim == 2 else array.shape[2])
    bit_depth = header.bit_depth or array.dtype.itemsize * 8  # (JPEG headers always give both)
    return Inspection(True, header.format, header.width, header.height, channels, bit_depth)


def _strict_jpeg(data: bytes, channels: int) -> np.ndarray:
    """Decode at 1/8 scale (luma, or CMYK as stored) with libjpeg's warnings as errors.

    libjpeg still entropy-decodes every block of every component at 1/8 (the
    Huffman stream is interleaved), so the whole scan is proven readable.
    """
    try:
        return simplejpeg.decode_jpeg(data, colorspace=_STRICT_JPEG[channels], min_height=1, min_width=1,
                                      min_factor=_VALIDATION_REDUCTION, strict=True)
    except ValueError as err:
        raise ImageError("corrupt", f"libjpeg: {str(err).strip()[:200]}") from err


def _inspect_dicom(data: bytes, max_pixels: int, min_side: int) -> Inspection:
    try:
        _, facts = dicom_read.validate(data, max_pixels, min_side)
    except dicom_read.DicomError as err:
        return Inspection(False, "dicom", reason=err.reason, detail=err.detail)
    return Inspection(True, "dicom", facts.width, facts.height, facts.samples, facts.bits_stored)


def reduction(width: int, height: int, size: int, policy: str = "stretch") -> int:
    """The largest of libjpeg's DCT scalings (1/2, 1/4, 1/8) that still leaves the resize enough pixels.

    The side :func:`resize` scales to ``size`` is the short one for
    ``stretch`` and ``crop``, the long one for ``pad``; it must stay at least
    ``size`` after the reduction, so the resize only ever shrinks.
    """
    side = max(width, height) if policy == "pad" else min(width, height)
    return next((f for f in (8, 4, 2) if side // f >= size), 1)


def decode_rgb(data: bytes, size: int | None = None, policy: str = "stretch") -> np.ndarray:
    """Decode to 8-bit RGB, HxWx3, with EXIF orientation applied.

    Grayscale is replicated, alpha dropped, 16-bit scaled to 8-bit and CMYK
    converted, all by OpenCV's colour path. Given the target ``size`` (and the
    resize policy), an 8-bit JPEG is decoded at reduced scale in the DCT
    domain (:func:`reduction`): a 12-megapixel photograph bound for 224 x 224
    never exists at full size. Raises :class:`ImageError`.
    """
    if not data:
        raise ImageError("empty", "the file has no bytes")
    flags = cv2.IMREAD_COLOR
    if size is not None and sniff(data) == "jpeg":
        try:
            header = _jpeg_header(data)
        except (ImageError, struct.error):
            header = None  # the decoder decides, at full scale
        if header is not None and header.bit_depth == 8:
            flags = _REDUCED_COLOR.get(reduction(header.width, header.height, size, policy), flags)
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if array is None:
        raise ImageError("corrupt", "OpenCV could not decode the bytes")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)


def resize(image: np.ndarray, size: int, policy: str = "stretch") -> np.ndarray:
    """Resize an HxWxC image to ``size`` x ``size``.

    ``stretch`` ignores the aspect ratio; ``crop`` keeps the centred square;
    ``pad`` centres the image on a black square. Area interpolation when
    shrinking (no aliasing), linear when enlarging.
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    height, width = image.shape[:2]
    if policy == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        image = image[top:top + side, left:left + side]
    elif policy == "pad":
        # The long side to ``size`` first, then the black bars: padding first
        # would allocate max(h, w) squared pixels (a valid 65,535 x 8 TIFF
        # became a 12.9 GB canvas; found by tests/test_fuzz.py).
        scale = size / max(height, width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale <= 1 else cv2.INTER_LINEAR)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        return cv2.copyMakeBorder(image, top, size - new_h - top, left, size - new_w - left,
                                  cv2.BORDER_CONSTANT, value=0)
    shrinking = image.shape[0] >= size and image.shape[1] >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def prepare(data: bytes, size: int, policy: str = "stretch", *, mammo_flip_right: bool = False,
            mammo_crop: bool = False, reduced: bool = True, shades_of_grey: int = 0) -> np.ndarray:
    """Stored bytes to the model's input: uint8 RGB, ``size`` x ``size`` x 3.

    JPEGs decode at the largest DCT reduction that still leaves at least
    ``size`` pixels (``reduced``; False decodes at full size, for comparison:
    docs/benchmarks.md measures both). DICOM: the first frame through
    :func:`oncolake.dicom.pixels.display`; for mammograms (Modality MG)
    right-side views are mirrored so every breast faces the same way
    (``mammo_flip_right``) and the image is cropped to the breast
    (``mammo_crop``) before the resize. ``shades_of_grey`` > 0 then corrects
    the colour of the light (:func:`colour_constancy`, that Minkowski norm).
    """
    if dicom_read.is_dicom(data):
        image = _dicom_rgb(data, size, mammo_flip_right, mammo_crop)
    else:
        image = decode_rgb(data, size, policy) if reduced else decode_rgb(data)
    return finish(image, size, policy, shades_of_grey)


def finish(image: np.ndarray, size: int, policy: str = "stretch", shades_of_grey: int = 0) -> np.ndarray:
    """A decoded RGB image to the model's input: :func:`prepare`'s steps after the decode."""
    image = resize(image, size, policy)
    if shades_of_grey:
        image = colour_constancy(image, shades_of_grey)
    return np.ascontiguousarray(image, dtype=np.uint8)


def colour_constancy(image: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades-of-grey colour constancy (Finlayson and Trezzi, 2004) of a uint8 RGB image.

    The light's colour is estimated per channel as the Minkowski p-norm of
    its pixels (p=1 is grey world; 6, the usual choice for dermoscopy, leans
    towards the brightest pixels), and each channel is scaled so that the
    estimate becomes neutral grey of the same length. It removes the colour
    cast one camera or one clinic's lighting gives every image. A grey image
    (R = G = B: ultrasound, mammograms) is returned unchanged.
    """
    if p < 1:
        raise ValueError(f"the shades-of-grey norm must be at least 1, got {p}")
    image = np.ascontiguousarray(image, dtype=np.uint8)
    # by histogram: each level's count times level ** p, exact in float64 and
    # a fifth of the time of raising every pixel (docs/benchmarks.md)
    counts = np.stack([cv2.calcHist([image], [c], None, [256], [0, 256]).ravel() for c in range(3)])
    light = (counts.astype(np.float64) @ _powers(p) / (image.shape[0] * image.shape[1])) ** (1.0 / p)
    length = math.sqrt(float(light @ light))
    if length == 0.0:
        return image  # all black: no light to correct
    gains = np.divide(length / math.sqrt(3.0), light, out=np.ones_like(light), where=light > 0)
    table = np.clip(np.rint(_LEVELS[:, None] * gains), 0, 255).astype(np.uint8).reshape(256, 1, 3)
    return cv2.LUT(image, table)


_LEVELS = np.arange(256, dtype=np.float64)


@functools.lru_cache(maxsize=8)
def _powers(p: int) -> np.ndarray:
    return _LEVELS ** p


#: What :func:`image_statistics` measures, in its order.
STATISTICS = ("brightness", "contrast", "sharpness")


def image_statistics(tensor: np.ndarray) -> tuple[float, float, float]:
    """Brightness, contrast and sharpness of a model tensor (uint8 RGB), as the model sees the image.

    On the grey image scaled to [0, 1]: brightness is the mean, contrast the
    standard deviation (RMS contrast), sharpness the variance of the
    Laplacian (the usual focus measure: a blurred image has few edges).
    Measured on :func:`prepare`'s output, so a night's images and the
    model's reference are measured at the same size the same way.
    """
    grey = cv2.cvtColor(np.ascontiguousarray(tensor, dtype=np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float64) / 255.0
    return float(grey.mean()), float(grey.std()), float(cv2.Laplacian(grey, cv2.CV_64F).var())


def dicom_modality(data: bytes) -> str | None:
    """The Modality of a DICOM file's header (None if absent or not DICOM)."""
    if not dicom_read.is_dicom(data):
        return None
    try:
        return dicom_read.modality(dicom_read.parse(data))
    except dicom_read.DicomError:
        return None


def _dicom_rgb(data: bytes, size: int, flip_right: bool, crop: bool) -> np.ndarray:
    from oncolake.dicom import pixels
    ds = dicom_read.parse(data)
    image = pixels.display(ds, max_side=max(DICOM_WORKING_SCALE * size, 512))
    if dicom_read.modality(ds) == "MG" and image.ndim == 2:
        laterality = (dicom_read.laterality(ds) or "").upper()
        if flip_right and laterality == "R":
            image = cv2.flip(image, 1)
        if crop:
            image = crop_foreground(image)
    return image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)


def crop_foreground(grey: np.ndarray, min_fraction: float = 0.05) -> np.ndarray:
    """The bounding box of the largest bright connected region of an 8-bit grey image.

    Otsu's threshold on a blurred copy separates tissue from the dark
    background; labels and markers are smaller components and fall outside.
    If the largest region covers less than ``min_fraction`` of the image, the
    image is returned whole (nothing trustworthy to crop to).
    """
    blurred = cv2.GaussianBlur(grey, (5, 5), 0)
    _, mask = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return grey
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = (int(v) for v in stats[biggest])
    if area < min_fraction * grey.size:
        return grey
    return grey[y:y + h, x:x + w]


# --- container parsers ---------------------------------------------------------

def _jpeg_header(data: bytes) -> Header:
    pos, end = 2, len(data)
    frame = None
    while True:
        if pos + 2 > end:
            raise ImageError("truncated", "JPEG ends before its first scan")
        if data[pos] != 0xFF:
            raise ImageError("corrupt", f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # stand-alone markers
            pos += 2
            continue
        if marker == 0xD9:
            raise ImageError("corrupt", "JPEG ends before any scan (an EXIF thumbnail alone is not an image)")
        if pos + 4 > end:
            raise ImageError("truncated", "JPEG ends before its first scan")
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in _JPEG_SOF:
            if pos + 10 > end:
                raise ImageError("truncated", "JPEG frame header ends early")
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 4:pos + 10])
            frame = (width, height, components, precision)
        if marker == 0xDA:
            break
        pos += 2 + length
    if frame is None:
        raise ImageError("corrupt", "JPEG has a scan but no frame header")
    # Entropy-coded data escapes 0xFF as FF00, so FFD9 after the scan starts is the real end.
    if data.find(b"\xff\xd9", pos) < 0:
        raise ImageError("truncated", "JPEG has no end-of-image marker after its scan data")
    width, height, components, precision = frame
    return Header("jpeg", width, height, components, precision)


def _png_header(data: bytes) -> Header:
    pos, end = 8, len(data)
    header = None
    while True:
        if pos + 8 > end:
            raise ImageError("truncated", "PNG ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        stop = pos + 12 + length
        if stop > end:
            raise ImageError("truncated", f"PNG chunk {kind!r} runs past the end of the file")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[stop - 4:stop])
        if zlib.crc32(kind + body) != crc:
            raise ImageError("corrupt", f"PNG chunk {kind!r} fails its CRC check")
        if header is None:
            if kind != b"IHDR" or length != 13:
                raise ImageError("corrupt", "PNG does not start with an IHDR chunk")
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            header = [width, height, _PNG_CHANNELS.get(color), depth]
        elif kind == b"tRNS" and header[2] == 3:
            header[2] = 4
        elif kind == b"IEND":
            break
        pos = stop
    if header[2] is None:
        raise ImageError("corrupt", "PNG has an unknown colour type")
    return Header("png", header[0], header[1], header[2], header[3])


def _bmp_header(data: bytes) -> Header:
    declared_size, offset, dib = struct.unpack("<I4xII", data[2:18])
    if dib == 12:
        width, height, _, bpp = struct.unpack("<HHHH", data[18:26])
        compression = 0
    else:
        width, height, _, bpp, compression = struct.unpack("<iiHHI", data[18:34])
    height = abs(height)
    if compression == 0:  # uncompressed rows are padded to 4 bytes
        needed = offset + height * (((width * bpp + 31) // 32) * 4)
        if len(data) < needed:
            raise ImageError("truncated", f"BMP needs {needed} bytes, has {len(data)}")
    elif declared_size and len(data) < declared_size:
        raise ImageError("truncated", f"BMP header says {declared_size} bytes, has {len(data)}")
    return Header("bmp", width, height, None, None)


def _tiff_header(data: bytes) -> Header:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    sizes = {1: 1, 3: 2, 4: 4, 16: 8}
    codes = {1: "B", 3: "H", 4: "I", 16: "Q"}
    tags: dict[int, tuple[int, ...]] = {}
    for i in range(count):
        entry = data[ifd + 2 + 12 * i: ifd + 14 + 12 * i]
        tag, kind, n = struct.unpack(order + "HHI", entry[:8])
        if kind not in sizes:
            continue
        span = sizes[kind] * n
        raw = entry[8:8 + span] if span <= 4 else data[struct.unpack(order + "I", entry[8:12])[0]:][:span]
        if len(raw) < span:
            raise ImageError("truncated", f"TIFF tag {tag} points past the end of the file")
        tags[tag] = struct.unpack(order + codes[kind] * n, raw)
    if 256 not in tags or 257 not in tags:
        raise ImageError("corrupt", "TIFF has no image width or length")
    for offsets, counts in ((273, 279), (324, 325)):  # strips, tiles
        if offsets in tags and counts in tags:
            last = max(o + c for o, c in zip(tags[offsets], tags[counts]))
            if last > len(data):
                raise ImageError("truncated", f"TIFF image data needs {last} bytes, has {len(data)}")
    samples = tags.get(277, (None,))[0]
    depth = tags.get(258, (None,))[0]
    return Header("tiff", tags[256][0], tags[257][0], samples, depth)


def _looks_like_text(head: bytes) -> bool:
    text = head.decode("utf-8", errors="replace")
    printable = sum((ch.isprintable() and ch != "\ufffd") or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * max(len(text), 1)
