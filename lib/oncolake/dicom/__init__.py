"""DICOM: validation, keyed de-identification and pixels. No Spark here.

* :mod:`oncolake.dicom.read` parses a Part 10 file, decides whether it is an
  image the lake can take (or why not) and decodes its pixels;
* :mod:`oncolake.dicom.deid` removes what identifies the patient (PS3.15
  Annex E, Basic Profile with the Retain Longitudinal Temporal Information
  with Modified Dates and Clean Descriptors options, from idiscore's copy of
  table E.1-1) and replaces identifiers with keyed pseudonyms.

Nothing here logs, raises or warns with a tag value: pydicom's own validation
warnings (which quote values) are switched off, and every error message is
one of a fixed set.
"""
from oncolake.dicom.read import is_dicom

__all__ = ["is_dicom"]
