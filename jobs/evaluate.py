"""Evaluate a registered model on its tensor dataset's test split.

Reads LAKE/models/NAME/v<M>/ (the newest unless --model) and the validation
and test splits of the tensor version it was trained on. The threshold is
chosen on validation (train.threshold_rule: youden or a target sensitivity);
metrics on test only. Writes metrics.json, roc/pr/confusion/calibration PNGs
and report.html into the model's folder, and logs them to MLflow.

    scripts/submit.sh evaluate --lake lake --dataset busi [--model 3]
"""
import sys

from oncolake import cli, evaluation


def main(argv=None) -> int:
    p = cli.parser("evaluate", __doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", type=int, help="model version (default: the newest)")
    args = p.parse_args(argv)
    return cli.run_job("evaluate", args, lambda spark, cfg: evaluation.run(
        spark, cfg, dataset=args.dataset, model_version=args.model))


if __name__ == "__main__":
    sys.exit(main())
