"""A model card per registered model (``LAKE/models/NAME/vN/model_card.md``).

Rendered from the records the pipeline wrote, never typed by hand: the
model's ``model.json`` (training), the tensor version's manifest (data),
evaluate's ``metrics.json`` (internal results) and any ``external-*.json``
(external validation). Every figure in the card is one of theirs, formatted
with three decimals (counts as integers).
"""
from __future__ import annotations

from typing import Any

from oncolake.report import NOTICE


def _f(value: float) -> str:
    return f"{value:.3f}"


def _ci(pair) -> str:
    return f"{_f(pair[0])}-{_f(pair[1])}"


def _results(m: dict[str, Any]) -> list[str]:
    return [f"- ROC AUC {_f(m['auc'])} (95 % CI {_ci(m['auc_ci95'])}), {m['n']} images, {m['positives']} malignant",
            f"- sensitivity {_f(m['sensitivity'])} (95 % CI {_ci(m['sensitivity_ci95'])}), specificity "
            f"{_f(m['specificity'])} (95 % CI {_ci(m['specificity_ci95'])}), balanced accuracy "
            f"{_f(m['balanced_accuracy'])}",
            f"- expected calibration error {_f(m['ece'])}, Brier score {_f(m['brier'])}"]


def render(dataset: str, version: int, record: dict[str, Any], manifest: dict[str, Any], metrics: dict[str, Any],
           externals: dict[str, dict[str, Any]] | None = None) -> str:
    """The card as Markdown."""
    counts = manifest["class_counts"]
    lines = [f"# Model card: oncolake {dataset} v{version}", "",
             f"> **{NOTICE}**", "",
             "## Intended use",
             f"Research and education: a binary malignant-vs-benign score for {dataset} images of the kind it "
             "was trained on. Not for diagnosis, triage or any decision about a patient.", "",
             "## Training data",
             f"- dataset `{dataset}`, tensor version {record['tensors_version']} from Delta table version "
             f"{record['source_table_version']} of `bronze.images`, {record['size']} px ({record['resize']})",
             "- images per split (benign / malignant): " + "; ".join(
                 f"{split} {counts[split].get('0', 0)} / {counts[split].get('1', 0)}" for split in ("train", "val", "test")),
             f"- balancing of the training split: {manifest['balancing']['method']}",
             *([f"- colour constancy: shades of grey (Minkowski p = {record['pixels']['shades_of_grey']}), "
                "in training, evaluation, scoring and predict alike"]
               if (record.get("pixels") or {}).get("shades_of_grey") else []), "",
             "## Training",
             f"- architecture {record['architecture']}, {record['num_proc']} Horovod processes, "
             f"precision {record.get('precision', 'float32')}, {record['epochs_run']} epochs run",
             (f"- selection: the weights of epoch {record['best_epoch']} (validation ROC AUC "
              f"{_f(record['best_val_auc'])}), {record['selection']['weights']}; batch normalization: "
              f"{record['selection'].get('batch_norm', 'moving averages from training')}" if record.get("selection") else
              "- selection: not recorded (trained before oncolake registered the best epoch: retrain)")]
    hyper = record.get("hyperparameters") or {}
    if hyper.get("filters") and {"dense_units", "dropout"} <= hyper.keys():
        filters = [str(n) for n in hyper["filters"]]
        blocks = ", ".join(filters[:-1]) + " and " + filters[-1] if len(filters) > 1 else filters[0]
        # models from before train.stem existed had none
        lines.append("- network: " + (f"a stem convolution of {hyper['stem']} filters at stride two, then "
                                      if hyper.get("stem") else "")
                     + f"blocks of {blocks} filters (two 3x3 "
                       + ("separable " if record.get("architecture") == "separable" else "")
                       + f"convolutions, then max pooling), global average pooling, a dense layer of "
                         f"{hyper['dense_units']} units, dropout {_f(hyper['dropout'])} before the output "
                         f"(half of it after each block)")
    # models from before these settings existed had 0.1 of each
    factors = {name: hyper.get(name, 0.1) for name in ("rotation", "zoom", "brightness", "contrast")}
    lines.append("- augmentation (training only): random flips" + "".join(
        f", {name} up to {_f(value)}" + (" of a turn" if name == "rotation" else "")
        for name, value in factors.items() if value))
    if "learning_rate" in hyper:
        # models from before train.lr_schedule existed halved theirs on a plateau
        schedule = (f"half a cosine down to near 0 over {hyper['epochs']} epochs"
                    if hyper.get("lr_schedule") == "cosine" else
                    f"halved whenever the validation AUC stalled for half of the early-stopping patience "
                    f"of {hyper['patience']} epochs")
        lines.append(f"- optimiser: Adam, learning rate {_f(hyper['learning_rate'])} per Horovod process, "
                     f"{schedule}")
    if hyper.get("mixup") or hyper.get("label_smoothing"):
        lines.append("- regularisation: " + ", ".join(
            ([f"mixup, shares drawn from Beta({_f(hyper['mixup'])}, {_f(hyper['mixup'])})"] if hyper.get("mixup") else [])
            + ([f"label smoothing {_f(hyper['label_smoothing'])}"] if hyper.get("label_smoothing") else [])))
    if record.get("aux"):
        aux = record["aux"]
        lines.append(f"- auxiliary task (training only): a second head learned `{aux['attribute']}` "
                     f"({len(aux['classes'])} classes: {', '.join(aux['classes'])}), its loss weighted "
                     f"{_f(aux['weight'])}; the registered model has the malignant output only")
    fitted = record.get("calibration") or {}
    if fitted.get("method", "none") != "none":
        lines.append(f"- calibration: {fitted['method']} scaling fitted on validation, a = {_f(fitted['a'])}, "
                     f"b = {_f(fitted['b'])}; validation ECE {_f(fitted['val_ece_before'])} before, "
                     f"{_f(fitted['val_ece_after'])} after")
    else:
        lines.append("- calibration: none")
    lines += ["", "## Internal results (test split, never used for training or selection)",
              f"Threshold {_f(metrics['threshold'])}, chosen on validation ({metrics['threshold_rule']}).",
              *_results(metrics["test"])]
    lines += ["", "## External validation"]
    if externals:
        for name, ext in sorted(externals.items()):
            lines += [f"On `{name}` (another source; images also in `{dataset}` left out: "
                      f"{ext['external_left_out_as_seen']}), same threshold:", *_results(ext["external"]),
                      f"- gap to the internal test AUC: {_f(ext['auc_gap'])}"]
    else:
        lines.append("Not run yet (`evaluate --on OTHER`).")
    lines += ["", "## Subgroups (test split)"]
    for attribute, rows in (metrics.get("subgroups") or {}).items():
        parts = []
        for row in rows:
            auc = (f"AUC {_f(row['auc'])} ({_ci(row['auc_ci95'])})" if "auc" in row
                   else "too small" if row.get("too_small") else "one class")
            parts.append(f"{row['group']}: {row['n']} images, {auc}")
        lines.append(f"- {attribute}: " + "; ".join(parts))
    if not metrics.get("subgroups"):
        lines.append("No subgroup attributes in this dataset's labels.")
    lines += ["", "## Known limitations",
              "- Trained from scratch on one public dataset at low resolution; no clinical validation.",
              "- Intervals are wide on small test sets; subgroups under the configured minimum get no AUC.",
              "- Probabilities are calibrated on the validation split of the same source; on another source "
              "(see external validation) they may not hold.",
              "- Grad-CAM overlays show where the model looked, not why, and not whether it was right.", ""]
    return "\n".join(lines)
