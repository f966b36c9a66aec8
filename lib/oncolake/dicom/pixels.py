"""DICOM pixels to an 8-bit display image, downscaled before anything else.

Stored values -> (downscale) -> Modality LUT (rescale slope/intercept, or the
LUT) -> VOI LUT, else the first window centre/width, else the 0.5-99.5
percentile range -> MONOCHROME1 inverted -> uint8. Colour images are
converted to RGB and scaled to 8 bit. A 4,700 x 2,900 16-bit mammogram is
held once at full size (the decoder's output, 27 MB) and shrunk by area
averaging before any float copy is made.
"""
from __future__ import annotations

import cv2
import numpy as np
import pydicom.multival
from pydicom.dataset import Dataset
from pydicom.pixel_data_handlers import util

from oncolake.dicom import read


def display(ds: Dataset, max_side: int | None = None) -> np.ndarray:
    """The first frame as uint8: HxW for grey images, HxWx3 RGB for colour."""
    frame = read.first_frame(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if frame.ndim == 3:  # colour
        if photometric.startswith("YBR"):
            frame = util.convert_color_space(frame, photometric, "RGB")
        frame = _shrink(frame, max_side)
        if frame.dtype != np.uint8:
            top = float(2 ** int(ds.get("BitsStored", 16)) - 1)
            frame = np.clip(frame.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(frame)
    if "ModalityLUTSequence" in ds:  # a table: indexes need the stored integers
        frame = util.apply_modality_lut(frame, ds)
    frame = _shrink(frame, max_side).astype(np.float32)
    if "ModalityLUTSequence" not in ds:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        frame = frame * slope + intercept
    grey = _voi(frame, ds)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _shrink(frame: np.ndarray, max_side: int | None) -> np.ndarray:
    height, width = frame.shape[:2]
    if not max_side or max(height, width) <= max_side:
        return frame
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if frame.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        frame = frame.astype(np.float32)
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def _voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values to 0..255 by the VOI LUT, the first window, or percentiles."""
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        descriptor = [int(v) for v in item.LUTDescriptor]
        lut = np.asarray(item.LUTData, dtype=np.float32)
        entries, first = (descriptor[0] or 65536), descriptor[1]
        index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.int64)
        mapped = lut[index]
        top = float(2 ** descriptor[2] - 1) if descriptor[2] else float(lut.max() or 1)
        return np.clip(mapped * (255.0 / top), 0, 255).astype(np.uint8)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        # PS3.3 C.11.2.1.2.1, the LINEAR function
        scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
        return np.clip(scaled, 0, 255).astype(np.uint8)
    low, high = np.percentile(values, (0.5, 99.5))
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.clip((values - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return None
