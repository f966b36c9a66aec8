"""docs/notebooks run end to end with nbclient against a small lake built here, so they never rot."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import evaluate as evaluate_job
from jobs import ingest as ingest_job
from jobs import preprocess as preprocess_job
from oncolake import config, lake, registry, synthetic, training
from tests.conftest import ROOT, last_json

NOTEBOOKS = ROOT / "docs" / "notebooks"
# Executed in a child process: the kernel's ZeroMQ and asyncio plumbing then
# never writes to a pytest capture stream after the test has closed it.
EXECUTE = """
import sys
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[3]}}).execute()
nbformat.write(nb, sys.argv[2])
"""


def _run(job, capsys, *args) -> dict:
    code = job.main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return last_json(captured.out)


def _build(spark, capsys, root: Path, folder: Path, lake_dir: str) -> dict[int, float]:
    _run(ingest_job, capsys, "--lake", lake_dir, "--dataset", "syn", "--input", str(folder),
         "--labels", str(folder / "labels.csv"))
    _run(preprocess_job, capsys, "--lake", lake_dir, "--dataset", "syn", "--size", "16")
    lake_uri = lake.qualify(spark, lake_dir)
    aucs = {}
    for version, (seed, epochs) in enumerate(((1, 4), (2, 6)), start=1):
        model = training.build_model(16, [150.0] * 3, [40.0] * 3,
                                     config.TrainConfig(filters=(4,), dense_units=4, seed=seed))
        path = root / f"model-{version}.keras"
        model.save(path)
        history = {"loss": [0.7 - 0.05 * e for e in range(epochs)],
                   "val_auc": [0.5 + 0.04 * e for e in range(epochs)]}
        record = {"dataset": "syn", "architecture": "cnn3", "tensors_version": 1, "source_table_version": 1,
                  "size": 16, "resize": "stretch", "num_proc": 1, "epochs_run": epochs,
                  "best_epoch": epochs, "best_val_auc": history["val_auc"][-1], "history": history,
                  "selection": {"weights": "as trained"}, "modalities": ["unspecified"]}
        registry.register(spark, lake_uri, "syn", {"model.keras": path.read_bytes(),
                                                   "model.json": json.dumps(record).encode()})
        summary = _run(evaluate_job, capsys, "--lake", lake_dir, "--dataset", "syn", "--model", str(version))
        aucs[version] = summary["auc"]
    return aucs


def _outputs(nb) -> tuple[str, int]:
    """All text a notebook printed or displayed, and how many images it drew."""
    text, images = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", output
            text.append(output.get("text", ""))
            data = output.get("data", {})
            text.append(data.get("text/plain", "") + data.get("text/markdown", "") + data.get("text/html", ""))
            images += "image/png" in data
    return "".join(text), images


@pytest.mark.slow
@pytest.mark.notebooks
def test_explore_and_results_notebooks_run_and_show_the_lake(spark, tmp_path, capsys):
    nbformat = pytest.importorskip("nbformat")

    folder = synthetic.write_dataset(tmp_path / "in", groups=14, per_group=3, seed=4, malignant_every=2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    lake_dir = str(tmp_path / "lake")
    aucs = _build(spark, capsys, tmp_path, folder, lake_dir)
    refused = spark.read.format("delta").load(f"{lake_dir}/bronze/quarantine").select("reason").collect()
    env = {**os.environ, "ONCOLAKE_LAKE": lake_dir, "ONCOLAKE_DATASET": "syn", "ONCOLAKE_REPO": str(ROOT)}
    with open(folder / "labels.csv") as handle:
        labels = [row["label"] for row in csv.DictReader(handle)]

    executed = {}
    for name in ("explore", "results"):
        out = tmp_path / f"{name}.ipynb"
        run = subprocess.run([sys.executable, "-c", EXECUTE, str(NOTEBOOKS / f"{name}.ipynb"), str(out),
                              str(NOTEBOOKS)], env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-4000:]
        executed[name] = _outputs(nbformat.read(out, as_version=4))

    text, images = executed["explore"]
    assert f"{len(labels)} images, 14 groups" in text
    for label in ("benign", "malignant"):  # the class table, counted here from the CSV
        assert re.search(rf"{label}\s+{labels.count(label)}\s", text), label
    assert len(refused) == 1 and "1 files refused" in text and refused[0]["reason"] in text
    assert images >= 1  # the montage per class

    text, images = executed["results"]
    for version, auc in aucs.items():
        assert f"{auc:.3f}" in text, (version, auc)
    assert images >= 2  # the curves and the AUC comparison
    assert "research" in text.lower()  # the model card's notice
