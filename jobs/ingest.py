"""Ingest a folder of raw images into the lake's bronze Delta table.

Reads every file under --input (recursively, on the executors) and the
optional labels CSV (columns path, label, and lesion_id or patient_id);
writes LAKE/bronze/images (MERGE on dataset and SHA-256 of the bytes) and
LAKE/bronze/quarantine (bad files with their reason). Re-running changes
nothing. DICOM files are de-identified on the executors before any row is
built; they need the key named by ingest.dicom.key_file.

    scripts/submit.sh ingest --lake lake --dataset busi \\
        --input ../shared/data/busi --labels ../shared/data/busi/labels.csv
"""
import sys

from oncolake import cli, ingest


def main(argv=None) -> int:
    p = cli.parser("ingest", __doc__)
    p.add_argument("--dataset", required=True, help="dataset name, e.g. ham10000")
    p.add_argument("--input", required=True, help="folder of images (URI or path)")
    p.add_argument("--labels", help="labels CSV (URI or path); path relative to --input")
    p.add_argument("--ingest-date", help="YYYY-MM-DD partition (default: today, UTC)")
    p.add_argument("--modality", help="modality of the non-DICOM images, e.g. dermoscopy, US "
                                      "(default: ingest.modalities[DATASET], else ingest.default_modality)")
    args = p.parse_args(argv)
    return cli.run_job("ingest", args, lambda spark, cfg: ingest.run(
        spark, cfg, dataset=args.dataset, source=args.input, labels=args.labels,
        ingest_date=args.ingest_date, modality=args.modality))


if __name__ == "__main__":
    sys.exit(main())
