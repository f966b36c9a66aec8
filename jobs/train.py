"""Train the CNN on a tensor dataset version with Horovod on Spark; register the model.

Reads LAKE/silver/tensors/NAME/v<N>/ (the newest unless --tensors-version);
writes LAKE/models/NAME/v<M>/ (model.keras, model.json, tensorboard/) and
checkpoints under LAKE/models/NAME/_runs/. --resume continues the newest
unfinished run from its last checkpoint. A rerun with the same tensors and
settings trains nothing: it answers with the model already registered
(--again trains another).

    scripts/submit.sh train --lake lake --dataset busi --epochs 20 --num-proc 2
"""
import sys

from oncolake import cli, training


def main(argv=None) -> int:
    p = cli.parser("train", __doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-proc", type=int, help="Horovod processes (default: every task slot)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--tensors-version", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--again", action="store_true",
                   help="train and register another model even if one of these tensors and settings is")
    args = p.parse_args(argv)
    for option, key in (("epochs", "epochs"), ("num_proc", "num_proc"), ("batch_size", "batch_size")):
        if getattr(args, option) is not None:
            args.set.append(f"train.{key}={getattr(args, option)}")
    return cli.run_job("train", args, lambda spark, cfg: training.run(
        spark, cfg, dataset=args.dataset, tensors_version=args.tensors_version, resume=args.resume, again=args.again))


if __name__ == "__main__":
    sys.exit(main())
