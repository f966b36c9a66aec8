"""Parse and validate DICOM Part 10 files; decode their pixels.

Validation order, cheapest first, so a hostile file is refused before any
pixel buffer is allocated: the file structure (preamble, meta, every
element's length against the bytes there are), what kind of object it is
(DICOMDIR, a non-image object, an image without pixel data), burned-in
annotation, the transfer syntax's decoder, Rows x Columns x frames against
``max_pixels``, and only then a full decode of every frame.

Multi-frame images: every frame is decoded at ingest (all of them count
against ``max_pixels``); the model sees the first frame.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from typing import Iterator

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from oncolake.errors import ImageError

# pydicom's validation warnings quote the offending value, which may be a
# name: values are never validated (nor echoed) when read or written here.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE

#: Quarantine reasons DICOM adds to :data:`oncolake.imaging.REASONS`.
REASONS = ("no_pixel_data", "unsupported_transfer_syntax", "burned_in_phi", "not_an_image")
#: Verdicts that are not quarantined but skipped and counted.
SKIPPED = ("dicomdir", "not_dicom")

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Storage SOP classes of objects that are not images to learn from: structured
# reports and key object selections (88.*), presentation states (11.*),
# encapsulated documents (104.*), waveforms (9.*), radiotherapy objects
# (481.*), raw data (66) and spatial registration/fiducials (66.*).
_NOT_IMAGE_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.",
                      "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.9.",
                      "1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.66")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float


#: A DICOM file failed validation (the pipeline's ImageError; ``detail`` never quotes a tag value).
DicomError = ImageError


@dataclasses.dataclass(frozen=True)
class Facts:
    """What a valid DICOM image's header says; none of it identifies anyone."""

    width: int
    height: int
    frames: int
    samples: int
    bits_stored: int
    photometric: str
    transfer_syntax: str
    modality: str | None
    body_part: str | None
    laterality: str | None
    view_position: str | None
    manufacturer: str | None
    pixel_spacing: tuple[float, ...] | None


def is_dicom(data: bytes) -> bool:
    """True for a DICOM Part 10 file: a 128-byte preamble, then ``DICM``."""
    return len(data) > 132 and data[128:132] == b"DICM"


@contextlib.contextmanager
def _strict_reading() -> Iterator[None]:
    """pydicom raises (rather than warns) on a file that ends inside an element."""
    settings = pydicom_config.settings
    before = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode = before


def parse(data: bytes) -> Dataset:
    """The whole dataset, pixel data included, with its structure checked.

    Raises :class:`DicomError` (``truncated`` or ``corrupt``).
    """
    if not is_dicom(data):
        raise DicomError("corrupt", "no DICM marker after the 128-byte preamble")
    try:
        with warnings.catch_warnings(), _strict_reading():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
            ds.file_meta.TransferSyntaxUID  # noqa: B018 - a missing meta element raises here
    except EOFError as err:
        raise DicomError("truncated", "the file ends inside a data element") from err
    except (InvalidDicomError, AttributeError, KeyError) as err:
        raise DicomError("corrupt", f"the file meta information is incomplete ({type(err).__name__})") from err
    except Exception as err:  # pydicom raises many types for malformed input
        raise DicomError("corrupt", f"pydicom could not parse the file ({type(err).__name__})") from err
    for element in ds._dict.values():  # raw elements: nothing converted, nothing echoed
        length = getattr(element, "length", None)
        tell = getattr(element, "value_tell", None)
        if length is not None and tell is not None and length != 0xFFFFFFFF and tell + length > len(data):
            raise DicomError("truncated", f"element ({element.tag.group:04X},{element.tag.element:04X}) "
                                          f"needs {tell + length} bytes, the file has {len(data)}")
    return ds


def check(ds: Dataset, max_pixels: int, min_side: int, accept_burned_in: bool = False) -> Facts:
    """Decide whether ``ds`` is an image the lake takes; its facts if so.

    Raises :class:`DicomError` with a reason from :data:`REASONS`, ``dicomdir``,
    ``too_large`` or ``too_small``; pixels are not decoded here.
    """
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        raise DicomError("dicomdir", "a DICOMDIR index, not an image")
    if sop_class.startswith(_NOT_IMAGE_CLASSES):
        raise DicomError("not_an_image", f"SOP class {sop_class} is not an image")
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise DicomError("no_pixel_data", "the dataset has no Pixel Data element")
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES" and not accept_burned_in:
        raise DicomError("burned_in_phi", "BurnedInAnnotation is YES: the pixels may show identifying text "
                                          "(ingest.dicom.accept_burned_in accepts such files)")
    syntax = ds.file_meta.TransferSyntaxUID
    if not _decodable(syntax):
        raise DicomError("unsupported_transfer_syntax", f"no installed decoder for transfer syntax {syntax}")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    except (AttributeError, TypeError, ValueError) as err:
        raise DicomError("corrupt", f"image pixel module incomplete ({type(err).__name__})") from err
    if rows <= 0 or columns <= 0 or frames <= 0:
        raise DicomError("corrupt", f"header gives {columns}x{rows} pixels and {frames} frames")
    pixels = rows * columns * frames
    if pixels > max_pixels:
        raise DicomError("too_large", f"{columns}x{rows} x {frames} frames = {pixels} pixels exceeds "
                                      f"the limit of {max_pixels}")
    if min(rows, columns) < min_side:
        raise DicomError("too_small", f"{columns}x{rows} is below the minimum side of {min_side}")
    return Facts(
        width=columns, height=rows, frames=frames, samples=samples, bits_stored=bits,
        photometric=_text(ds, "PhotometricInterpretation") or "MONOCHROME2", transfer_syntax=str(syntax),
        modality=_text(ds, "Modality"), body_part=_text(ds, "BodyPartExamined"),
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
        view_position=_text(ds, "ViewPosition"), manufacturer=_text(ds, "Manufacturer"),
        pixel_spacing=_spacing(ds))


def decode(ds: Dataset) -> np.ndarray:
    """Every frame's stored values (frames x rows x columns [x samples]).

    Raises :class:`DicomError`: ``truncated`` when the pixel data is shorter
    than the header promises, ``corrupt`` when the decoder fails.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = ds.pixel_array
    except ValueError as err:
        if "length of the pixel data" in str(err):
            raise DicomError("truncated", "the pixel data is shorter than Rows x Columns x frames") from err
        raise DicomError("corrupt", f"the pixel data does not decode ({type(err).__name__})") from err
    except Exception as err:  # decoders raise RuntimeError, IndexError, ...
        raise DicomError("corrupt", f"the pixel data does not decode ({type(err).__name__})") from err
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return array if frames > 1 else array[np.newaxis]


def first_frame(ds: Dataset) -> np.ndarray:
    """The first frame's stored values (the frame the model sees)."""
    return decode(ds)[0]


def _decodable(syntax) -> bool:
    handlers = pydicom_config.pixel_data_handlers
    return any(h.is_available() and h.supports_transfer_syntax(syntax) for h in handlers)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or isinstance(value, (bytes, Dataset)):
        return None
    text = str(value).strip()
    return text or None


def _spacing(ds: Dataset) -> tuple[float, ...] | None:
    value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        return tuple(float(v) for v in value) if value else None
    except (TypeError, ValueError):
        return None


def validate(data: bytes, max_pixels: int, min_side: int, accept_burned_in: bool = False
             ) -> tuple[Dataset, Facts]:
    """Parse, check and fully decode ``data``; the dataset and its facts.

    Raises :class:`DicomError`.
    """
    ds = parse(data)
    facts = check(ds, max_pixels, min_side, accept_burned_in)
    decode(ds)  # every frame, so a file that fails later fails here
    return ds, facts


def modality(ds: Dataset) -> str | None:
    return _text(ds, "Modality")


def laterality(ds: Dataset) -> str | None:
    return _text(ds, "ImageLaterality") or _text(ds, "Laterality")
