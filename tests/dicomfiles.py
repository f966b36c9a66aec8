"""Synthetic DICOM files for the tests: patient identity in 30+ places, every transfer syntax.

Each identifying value is distinctive enough that finding it anywhere (a
Parquet cell, a Delta log, a log line) means it leaked. Pixels are encoded
with encoders independent of oncolake's decoders (OpenCV, imagecodecs,
openjpeg, pydicom's RLE), so decoded values can be compared to the array
that went in.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
                         ExplicitVRLittleEndian, RLELossless)

MG_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"          # Digital Mammography X-Ray Image Storage - For Presentation
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"        # Enhanced SR
SYNTAXES = {"jpeg_baseline": JPEGBaseline8Bit, "jpeg_lossless": JPEGLosslessSV1, "jpeg_ls": JPEGLSLossless,
            "jpeg_2000": JPEG2000Lossless, "rle": RLELossless, "native": ExplicitVRLittleEndian}
ORIGINAL_UID_ROOT = "1.2.826.0.1.3680043.2.1143.5512"

#: Strings that must never be found in the lake or a job's output (compared case-insensitively).
PHI_STRINGS = (
    "Quixotesmith", "Marybeth", "MRN-5512", "ALT-ID-88231", "19470823", "Wallaby", "5550-1234",
    "Ozymandias", "MRLOC-99102", "Quirinus", "Quirinville", "Drzewiecki", "Pangborn", "Okonkwo",
    "Zebediah", "Harrowgate", "QUIRMAMMO07", "SN-QX-4471", "ACC-2013", "STUDY-QX-5512", "Philippa",
    "Lighthouse", "RPID-55120", "SPSID-77812", "Vandersloot", ORIGINAL_UID_ROOT, "20130517", "20130602",
    "PRIVATE-PHI", "Brigadier",
)


def phi_dataset(pixels: np.ndarray, *, patient: str = "5512", view: str = "CC", laterality: str = "L",
                study_date: str = "20130517", instance: int = 1, modality: str = "MG",
                photometric: str = "MONOCHROME2") -> FileDataset:
    """A mammogram-like dataset with native pixels and identifying values in 30+ attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_CLASS
    meta.MediaStorageSOPInstanceUID = f"{ORIGINAL_UID_ROOT}.3.{patient}.{instance}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "QUIRMAMMO07"
    meta.SourceApplicationEntityTitle = "QUIRINUS_PACS"
    ds = FileDataset("synthetic", {}, file_meta=meta, preamble=b"Quixotesmith PREAMBLE".ljust(128, b"\0"))
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MG_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = f"{ORIGINAL_UID_ROOT}.1.{patient}"
    ds.SeriesInstanceUID = f"{ORIGINAL_UID_ROOT}.2.{patient}.{view}"
    ds.FrameOfReferenceUID = f"{ORIGINAL_UID_ROOT}.4.{patient}"
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = "101500"
    ds.Modality = modality
    ds.Manufacturer = "ACME Imaging"
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.PatientName = f"Quixotesmith^Marybeth^{patient}"
    ds.PatientID = f"MRN-{patient}-ZQX-{view}-{laterality}"
    ds.IssuerOfPatientID = "St Quirinus Hospital"
    ds.PatientBirthDate = "19470823"
    ds.PatientSex = "F"
    ds.PatientAddress = "42 Wallaby Way, Sydney"
    ds.PatientTelephoneNumbers = "+61-2-5550-1234"
    ds.PatientMotherBirthName = "Ozymandias^Gertrude"
    ds.MedicalRecordLocator = "MRLOC-99102"
    ds.OtherPatientNames = "Quixotesmith-Old^Marybeth"
    ds.MilitaryRank = "Brigadier"
    ds.Occupation = "Lighthouse keeper"
    ds.AdditionalPatientHistory = "Sister Philippa Quixotesmith carries BRCA1"
    ds.PatientComments = "Call Marybeth on 5550-1234"
    ds.InstitutionName = "St Quirinus Hospital"
    ds.InstitutionAddress = "1 Infirmary Road, Quirinville"
    ds.InstitutionalDepartmentName = "Quirinus Breast Imaging"
    ds.ReferringPhysicianName = "Drzewiecki^Anatol"
    ds.PerformingPhysicianName = "Pangborn^Wilhelmina"
    ds.NameOfPhysiciansReadingStudy = "Okonkwo-Brandt^Felix"
    ds.OperatorsName = "Tech^Zebediah"
    ds.RequestingPhysician = "Harrowgate^Clementine"
    ds.StationName = "QUIRMAMMO07"
    ds.DeviceSerialNumber = "SN-QX-4471-B"
    ds.AccessionNumber = f"ACC-{study_date}-7781"
    ds.StudyID = "STUDY-QX-5512"
    ds.StudyDescription = "Screening for Marybeth Quixotesmith"
    ds.SeriesDescription = "Quixotesmith bilateral"
    ds.ProtocolName = "Quixotesmith protocol"
    ds.ImageComments = "Patient Marybeth Quixotesmith was anxious"
    ds.ReferencedStudySequence = Sequence([_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                                                 ReferencedSOPInstanceUID=f"{ORIGINAL_UID_ROOT}.9.{patient}")])
    other = _item(PatientID=f"ALT-ID-88231-{patient}", IssuerOfPatientID="Quirinus Regional",
                  TypeOfPatientID="TEXT")
    ds.OtherPatientIDsSequence = Sequence([other])
    request = _item(RequestedProcedureID="RPID-55120", ScheduledProcedureStepID="SPSID-77812",
                    RequestedProcedureDescription="Mammogram for Quixotesmith",
                    ScheduledPerformingPhysicianName="Vandersloot^Ignatius",
                    ScheduledProcedureStepStartDate="20130602")
    request.add_new(0x00310010, "LO", "QUIRINUS PRIVATE")
    request.add_new(0x00311001, "LO", "PRIVATE-PHI nested Quixotesmith")
    ds.RequestAttributesSequence = Sequence([request])
    ds.add_new(0x00110010, "LO", "QUIRINUS PRIVATE")
    ds.add_new(0x00111001, "LO", "PRIVATE-PHI Marybeth Quixotesmith")
    ds.add_new(0x00111002, "SQ", Sequence([_item(PatientName="Quixotesmith^Private")]))
    set_pixels(ds, pixels, photometric)
    return ds


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> None:
    """Native (uncompressed) pixel data for a grey image (rows x cols, or frames x rows x cols)."""
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"


def encode(ds: FileDataset, syntax: str) -> FileDataset:
    """Re-encode ``ds``'s native pixels with the transfer syntax named in :data:`SYNTAXES`."""
    uid = SYNTAXES[syntax]
    if syntax == "native":
        return ds
    array = ds.pixel_array
    frames = array if array.ndim == 3 else array[np.newaxis]
    if syntax == "rle":
        ds.compress(RLELossless, array)
        return ds
    encoded = []
    for frame in frames:
        if syntax == "jpeg_baseline":
            assert frame.dtype == np.uint8, "JPEG baseline takes 8-bit pixels"
            ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
            encoded.append(data.tobytes())
        elif syntax == "jpeg_lossless":
            import imagecodecs
            encoded.append(imagecodecs.jpeg8_encode(frame, lossless=True, predictor=1,
                                                    bitspersample=int(ds.BitsStored)))
        elif syntax == "jpeg_ls":
            import imagecodecs
            encoded.append(imagecodecs.jpegls_encode(frame))
        elif syntax == "jpeg_2000":
            import openjpeg
            encoded.append(openjpeg.encode(frame, bits_stored=int(ds.BitsStored)) if frame.dtype != np.uint8
                           else openjpeg.encode(frame))
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid
    return ds


def write(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), write_like_original=False)
    return path


def gradient(rows: int = 96, cols: int = 64, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A 'breast': a bright half-ellipse against a dark background, plus noise (uint16 or uint8)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    inside = ((y - rows / 2) / (rows * 0.45)) ** 2 + (x / (cols * 0.8)) ** 2 <= 1
    top = 2 ** bits - 1
    image = np.where(inside, 0.55 * top + 0.3 * top * (1 - x / cols), 0.03 * top)
    image = np.clip(image + rng.normal(0, 0.02 * top, image.shape), 0, top)
    return image.astype(np.uint8 if bits == 8 else np.uint16)


def dicomdir(path: Path) -> Path:
    """A minimal DICOMDIR (Media Storage Directory Storage)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = "2.25.1234"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("DICOMDIR", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.FileSetID = "SET1"
    ds.DirectoryRecordSequence = Sequence([_item(DirectoryRecordType="PATIENT", PatientID="SET-INDEX-1")])
    return write(ds, path)


def structured_report(path: Path) -> Path:
    """An SR document: a DICOM object that is not an image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SR_CLASS
    meta.MediaStorageSOPInstanceUID = "2.25.5678"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("sr", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SR_CLASS, "2.25.5678", "SR"
    ds.ContentDate = dt.date(2020, 1, 1).strftime("%Y%m%d")
    return write(ds, path)
