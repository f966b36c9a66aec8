"""Keyed de-identification of a DICOM dataset, on the executor, before any row is built.

The rule table is DICOM PS3.15 table E.1-1 as idiscore ships it (scraped from
the standard): the Basic Application Level Confidentiality Profile, then the
Retain Longitudinal Temporal Information with Modified Dates option, then the
Clean Descriptors option (a later rule set wins for a tag). Every private tag
is removed, and sequences are cleaned item by item, recursively. What the
actions become here:

* ``U`` (UIDs): ``2.25.`` + the decimal of the first 128 bits of
  HMAC-SHA-256(key, "uid" + UID): the same UID always maps to the same new
  one, so study and series structure survives; unlinkable without the key;
* ``C`` on dates (DA, and the date part of DT): shifted back by a whole number
  of days keyed by the patient (1 to 3,650 days), so intervals within one
  patient survive; times of day are kept; ``C`` on text (descriptions,
  comments): replaced by ``CLEANED`` (idiscore's cleaning; free text is not
  parsed);
* ``X``, ``Z``, ``D`` and their combinations: removed, emptied or given a
  dummy value, as idiscore maps them;
* Patient ID and Patient's Name become the patient pseudonym
  (``PSN-`` + 24 hex digits of HMAC-SHA-256(key, "patient" + patient)),
  where the patient is the first group of ``patient_id_pattern`` matched
  against Patient ID (the whole ID without a pattern).

The file meta is rebuilt (no source application, no original SOP instance
UID) and the 128-byte preamble, which may hold anything, is zeroed.
Patient Identity Removed, the de-identification method and its code sequence
(113100, 113107, 113105) and Longitudinal Temporal Information Modified are
set, as PS3.15 E.1.1 asks.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import hmac
import io
import re
import warnings
from pathlib import Path

from idiscore.core import Core, Profile
from idiscore.dicom import ActionCodes
from idiscore.operators import Clean, ElementShouldBeRemoved, Operator, Remove
from idiscore.rule_sets import DICOMRuleSets
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from oncolake.errors import ConfigError

MIN_KEY_BYTES = 32
MAX_SHIFT_DAYS = 3650
METHOD = ("PS3.15 E.1 Basic Application Level Confidentiality Profile, Retain Longitudinal Temporal "
          "Information with Modified Dates, Clean Descriptors (idiscore 1.2.0 rule table); "
          "HMAC-SHA-256 pseudonyms (oncolake)")
_CODES = (("113100", "Basic Application Confidentiality Profile"),
          ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
          ("113105", "Clean Descriptors Option"))


def load_key(path: str) -> bytes:
    """The secret key from ``path`` (``ingest.dicom.key_file``); never logged.

    Raises :class:`ConfigError` when there is no usable key.
    """
    if not path:
        raise ConfigError("DICOM ingest needs a secret key: set ingest.dicom.key_file or ONCOLAKE_DICOM_KEY_FILE "
                          f"to a file of at least {MIN_KEY_BYTES} random bytes (scripts/dicom-key.sh makes one)")
    try:
        key = Path(path).read_bytes().strip()
    except OSError as err:
        raise ConfigError(f"cannot read the DICOM key file {path} ({err.strerror})") from err
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the DICOM key file {path} holds {len(key)} bytes; it needs at least {MIN_KEY_BYTES}")
    return key


@dataclasses.dataclass(frozen=True)
class Pseudonyms:
    """Keyed, deterministic replacements for identifiers."""

    key: bytes
    patient_id_pattern: str = ""

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}\0{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def image_id(self, data: bytes) -> str:
        """The image's id: a keyed hash of the original file's bytes."""
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()

    def patient_part(self, patient_id: str) -> str:
        if self.patient_id_pattern:
            match = re.search(self.patient_id_pattern, patient_id)
            if match and match.groups() and match.group(1):
                return match.group(1)
        return patient_id

    def patient(self, patient_id: str) -> str | None:
        """The patient's pseudonym, or None for an empty Patient ID."""
        part = self.patient_part(patient_id.strip())
        return f"PSN-{self._mac('patient', part).hex()[:24]}" if part else None

    def uid(self, uid: str) -> str:
        return f"2.25.{int.from_bytes(self._mac('uid', uid.strip())[:16], 'big')}"

    def shift_days(self, pseudonym: str) -> int:
        return 1 + int.from_bytes(self._mac("days", pseudonym)[:8], "big") % MAX_SHIFT_DAYS


class _KeyedUID(Operator):
    name = "keyed UID"
    nema_action_code = ActionCodes.UID

    def __init__(self, pseudonyms: Pseudonyms):
        self.pseudonyms = pseudonyms

    def apply(self, element: DataElement, dataset: Dataset | None = None) -> DataElement:
        value = element.value
        if not value:
            return copy.copy(element)
        values = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "append") else [value]
        new = [self.pseudonyms.uid(str(v)) for v in values]
        return DataElement(element.tag, element.VR, new if len(new) > 1 else new[0])


class _ShiftDates(Clean):
    """``C``: dates moved back by this patient's days; text cleaned as idiscore does."""

    name = "Clean (keyed date shift)"

    def __init__(self):
        super().__init__()
        self.days = 0

    def apply(self, element: DataElement, dataset: Dataset | None = None) -> DataElement:
        if element.tag.is_private:
            raise ElementShouldBeRemoved()
        if element.VR in ("DA", "DT"):
            return DataElement(element.tag, element.VR, _shift(element.value, element.VR, self.days))
        if element.VR == "TM":
            return copy.copy(element)
        return super().apply(element, dataset)


def _shift(value, vr: str, days: int):
    values = list(value) if hasattr(value, "append") else [value]
    out = []
    for v in values:
        text = str(v or "").strip()
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d") - dt.timedelta(days=days)
            out.append(day.strftime("%Y%m%d") + (text[8:] if vr == "DT" else ""))
        except ValueError:
            out.append("")  # not a date we can shift: emptied rather than kept
    return out if len(out) > 1 else out[0]


class Deidentifier:
    """One per Python worker: the profile is built once, the date shift set per file."""

    def __init__(self, pseudonyms: Pseudonyms):
        self.pseudonyms = pseudonyms
        self._dates = _ShiftDates()
        sets = DICOMRuleSets(action_mapping={ActionCodes.UID: _KeyedUID(pseudonyms),
                                             ActionCodes.CLEAN: self._dates})
        profile = Profile([sets.basic_profile, sets.retain_modified_dates, sets.clean_descriptors], name="oncolake")
        self._core = Core(profile)
        self._rules = profile.flatten()

    def deidentify(self, ds: Dataset) -> tuple[Dataset, str | None]:
        """De-identify ``ds`` in place; returns it and the patient pseudonym."""
        patient = self.pseudonyms.patient(str(ds.get("PatientID", "") or ""))
        self._dates.days = self.pseudonyms.shift_days(patient or "")
        meta = ds.file_meta
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # idiscore recurses into every sequence and never applies the
            # sequence's own rule: a sequence the table removes goes first.
            _drop_removed_sequences(ds, self._rules)
            self._core.deidentify(ds)
            _strip_private(ds)
        ds.PatientID = patient or ""
        ds.PatientName = patient or ""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        ds.DeidentificationMethodCodeSequence = Sequence([_code(v, m) for v, m in _CODES])
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.file_meta = _new_meta(meta, ds)
        ds.preamble = b"\0" * 128
        return ds, patient

    def to_bytes(self, ds: Dataset) -> bytes:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buffer, write_like_original=False)
        return buffer.getvalue()


def _drop_removed_sequences(ds: Dataset, rules) -> None:
    for element in list(ds):
        if element.VR != "SQ":
            continue
        rule = rules.get_rule(element)
        if rule is not None and isinstance(rule.operation, Remove):
            del ds[element.tag]
        else:
            for item in element.value:
                _drop_removed_sequences(item, rules)


def _strip_private(ds: Dataset) -> None:
    """Remove private tags at every depth (the rule table's own rule covers the top level)."""
    ds.remove_private_tags()
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _strip_private(item)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _new_meta(old: FileMetaDataset, ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or ""
    meta.TransferSyntaxUID = old.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta

