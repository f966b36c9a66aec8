"""Evaluate a registered model on its tensor dataset's test split.

Reads LAKE/models/NAME/v<M>/ (the newest unless --model) and the validation
and test splits of the tensor version it was trained on. The threshold is
chosen on validation (train.threshold_rule: youden or a target sensitivity);
metrics on test only. Writes metrics.json, roc/pr/confusion/calibration PNGs
and report.html into the model's folder, and logs them to MLflow.

    scripts/submit.sh evaluate --lake lake --dataset busi [--model 3]
    scripts/submit.sh evaluate --lake lake --dataset ham --on isic   # external validation

With --on OTHER, the model is also scored on every labelled image of dataset
OTHER in bronze (none of them seen in training: images whose bytes are in
the model's own dataset are left out) at the threshold chosen on its own
validation split; writes external-OTHER.json and report-external-OTHER.html.
"""
import sys

from oncolake import cli, evaluation


def main(argv=None) -> int:
    p = cli.parser("evaluate", __doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", type=int, help="model version (default: the newest)")
    p.add_argument("--on", metavar="OTHER", help="external validation: every labelled image of dataset OTHER")
    args = p.parse_args(argv)
    return cli.run_job("evaluate", args, lambda spark, cfg: evaluation.run(
        spark, cfg, dataset=args.dataset, model_version=args.model, on=args.on))


if __name__ == "__main__":
    sys.exit(main())
