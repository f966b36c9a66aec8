"""Evaluation plots (PNG) and one self-contained HTML report."""
from __future__ import annotations

import base64
import html
import io
import json
from typing import Any

import numpy as np

from oncolake import metrics

NOTICE = ("For research and education only. Not a medical device and not a diagnosis; "
          "no substitute for a clinician.")


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def plots(labels, scores, threshold: float, test_metrics: dict[str, Any], uncalibrated=None) -> dict[str, bytes]:
    """ROC, precision-recall, confusion-matrix and calibration plots as PNG bytes.

    With ``uncalibrated`` (the model's scores before its calibration map), the
    reliability diagram shows both.
    """
    y, s = np.asarray(labels), np.asarray(scores)
    out = {}
    plt, fig, ax = _figure()
    fpr, tpr, _ = metrics.roc_curve(y, s)
    ax.plot(fpr, tpr, label=f"AUC {test_metrics['auc']:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.scatter([1 - test_metrics["specificity"]], [test_metrics["sensitivity"]], color="red", zorder=3,
               label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test split)")
    ax.legend(loc="lower right")
    out["roc.png"] = _png(plt, fig)

    plt, fig, ax = _figure()
    order = np.argsort(-s, kind="mergesort")
    hits = np.cumsum(y[order])
    ax.plot(hits / max(y.sum(), 1), hits / np.arange(1, len(y) + 1), label=f"AP {test_metrics['pr_auc']:.3f}")
    ax.axhline(y.mean(), linestyle="--", color="grey", linewidth=0.8, label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall (test split)",
           ylim=(0, 1.02))
    ax.legend(loc="upper right")
    out["pr.png"] = _png(plt, fig)

    plt, fig, ax = _figure()
    c = test_metrics["confusion"]
    grid = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    ax.imshow(grid, cmap="Blues")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=14)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["benign", "malignant"],
           yticklabels=["benign", "malignant"], xlabel="predicted", ylabel="true",
           title=f"Confusion at threshold {threshold:.3f}")
    out["confusion.png"] = _png(plt, fig)

    plt, fig, ax = _figure()
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    if uncalibrated is not None:
        before = metrics.calibration(y, uncalibrated)
        ax.plot(before["predicted"], before["observed"], "s:", color="grey",
                label=f"before calibration (ECE {metrics.expected_calibration_error(y, uncalibrated):.3f})")
    cal = metrics.calibration(y, s)
    ax.plot(cal["predicted"], cal["observed"], "o-", label=f"model (ECE {test_metrics['ece']:.3f})")
    ax.legend(loc="upper left")
    ax.set(xlabel="mean predicted probability", ylabel="observed malignant rate",
           title=f"Reliability, test split (Brier {test_metrics['brier']:.3f})", xlim=(0, 1), ylim=(0, 1))
    out["calibration.png"] = _png(plt, fig)
    return out


def explanations(rows: dict[str, list[tuple[np.ndarray, float]]]) -> bytes:
    """A grid of Grad-CAM overlays: one row per outcome, each image titled with its probability."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = max([len(v) for v in rows.values()] + [1])
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.4 * len(rows)), dpi=100, squeeze=False)
    for r, (outcome, items) in enumerate(rows.items()):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(items):
                image, probability = items[c]
                ax.imshow(image)
                ax.set_title(f"p = {probability:.2f}", fontsize=9)
        axes[r][0].text(-0.08, 0.5, outcome if items else f"{outcome}: none", transform=axes[r][0].transAxes,
                        rotation=90, va="center", ha="right", fontsize=10)
    fig.suptitle("Grad-CAM on test images (where the model looked, not whether it was right)", fontsize=10)
    return _png(plt, fig)


def _subgroup_section(subgroups: dict[str, list[dict[str, Any]]]) -> str:
    """Per-attribute tables of subgroup AUCs (small subgroups marked, not hidden)."""
    if not subgroups:
        return ""
    parts = ["<h2>Subgroups (test split)</h2><p>ROC AUC with a bootstrap 95 % interval per subgroup, "
             "so a reviewer sees where the model is weaker. Small subgroups say little.</p>"]
    for attribute, rows in subgroups.items():
        cells = []
        for row in rows:
            if "auc" in row:
                auc = f"{row['auc']:.3f} ({row['auc_ci95'][0]:.3f}-{row['auc_ci95'][1]:.3f})"
            else:
                auc = "too small for an AUC" if row.get("too_small") else "one class only"
            cells.append(f"<tr><td>{html.escape(row['group'])}</td><td>{row['n']}</td>"
                         f"<td>{row['positives']}</td><td>{auc}</td></tr>")
        parts.append(f"<h3>{html.escape(attribute)}</h3><table><tr><th>group</th><th>images</th>"
                     f"<th>malignant</th><th>ROC AUC (95 % CI)</th></tr>{''.join(cells)}</table>")
    return "".join(parts)


def html_report(title: str, metrics: dict[str, Any], images: dict[str, bytes], lineage: dict[str, Any],
                card: str | None = None) -> str:
    """One HTML page with the figures embedded (no external files)."""
    test = metrics["test"]
    rows = [("ROC AUC (95 % CI)", f"{test['auc']:.3f} ({test['auc_ci95'][0]:.3f}-{test['auc_ci95'][1]:.3f})"),
            ("PR AUC", f"{test['pr_auc']:.3f}"), ("balanced accuracy", f"{test['balanced_accuracy']:.3f}"),
            ("sensitivity", f"{test['sensitivity']:.3f}"), ("specificity", f"{test['specificity']:.3f}"),
            ("accuracy", f"{test['accuracy']:.3f}"), ("F1", f"{test['f1']:.3f}"),
            ("Brier score", f"{test['brier']:.3f}"),
            ("expected calibration error", f"{test['ece']:.3f}" + (
                f" ({html.escape(metrics['calibration_fit']['method'])} calibration on validation; "
                f"{metrics['calibration_fit']['test_ece_before']:.3f} before)" if metrics.get("calibration_fit")
                else " (uncalibrated)")),
            ("expected at this threshold (validation, 95 % CI)",
             f"sensitivity {metrics['val']['sensitivity']:.3f} ({metrics['val']['sensitivity_ci95'][0]:.3f}-"
             f"{metrics['val']['sensitivity_ci95'][1]:.3f}), specificity {metrics['val']['specificity']:.3f} "
             f"({metrics['val']['specificity_ci95'][0]:.3f}-{metrics['val']['specificity_ci95'][1]:.3f})"),
            ("threshold", f"{metrics['threshold']:.4f} ({html.escape(metrics['threshold_rule'])}, chosen on validation)"),
            ("test images (malignant)", f"{test['n']} ({test['positives']})")]
    chosen = metrics.get("selection") or {}
    if chosen.get("best_epoch"):
        rows.append(("model weights", f"epoch {chosen['best_epoch']}, the best validation epoch (validation AUC "
                                      f"{chosen['best_val_auc']:.4f} in training, {chosen['val_auc_rescored']:.4f} "
                                      "re-scored here)"))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"></figure>' for name, data in images.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}figure{{display:inline-block;margin:4px}}
.notice{{background:#fff3cd;padding:8px;border:1px solid #e0c060}}pre{{background:#f6f6f6;padding:8px}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p class="notice">{html.escape(NOTICE)}</p>
<h2>Test split</h2><table>{table}</table>
{_subgroup_section(metrics.get("subgroups") or {})}
<h2>Figures</h2>{figures}
{f"<h2>Model card</h2><pre>{html.escape(card)}</pre>" if card else ""}
<h2>Lineage</h2><pre>{html.escape(json.dumps(lineage, indent=2, sort_keys=True))}</pre>
</body></html>
"""
