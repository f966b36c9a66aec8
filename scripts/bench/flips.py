"""Test-time flips and a seed ensemble, measured on registered models without retraining.

For each registered model (``--model``, repeatable: ``--lake L --dataset D
--version N`` names ``L/models/D/vN``), its validation and test ROC AUC on
its own tensor splits with the plain forward pass (what evaluate reports),
with the mean of the image and its left-right mirror, and with the mean of
the image and both mirrors. With two or more models on the same splits (the
same image ids), also the AUC of their mean probability (an ensemble of
seeds). The cost of each is given next to its baseline, one plain pass over
the test split, in the same process.

One JSON line.

    scripts/bench.sh flips --model var/demo-lake:busi:1 --model var/results-busi:busi:1
"""
import time

import numpy as np

from oncolake import cli, evaluation, lake, metrics, registry


def main(argv=None) -> int:
    p = cli.parser("bench-flips", __doc__)
    p.add_argument("--model", action="append", required=True, metavar="LAKE:DATASET:VERSION",
                   help="a registered model; give two or more on the same splits for the ensemble")
    args = p.parse_args(argv)
    return cli.run_bench("bench-flips", args, lambda spark, cfg, work: _measure(spark, cfg, args.model))


def _measure(spark, cfg, names: list[str]) -> dict:
    models, splits = {}, {}
    for name in names:
        lake_path, dataset, version = name.rsplit(":", 2)
        lake_uri = lake.qualify(spark, lake_path)
        model_dir = registry.version_uri(lake_uri, dataset, int(version))
        record = registry.read_record(spark, model_dir)
        model = registry.load_model(spark, model_dir)
        tensors = lake.tensors_uri(lake_uri, dataset, record["tensors_version"])
        result, scored = {}, {}
        for split in ("val", "test"):
            url = registry.petastorm_url(f"{tensors}/split={split}")
            ids, x, y = evaluation.read_split(url, lake.petastorm_filesystem(url, cfg.hdfs))
            model.predict(x[:8], verbose=0)  # warm-up: traces the graph
            start = time.perf_counter()
            plain = model.predict(x, batch_size=cfg.score.batch_size, verbose=0).ravel()
            plain_s = time.perf_counter() - start
            start = time.perf_counter()
            left_right = model.predict(x[:, :, ::-1], batch_size=cfg.score.batch_size, verbose=0).ravel()
            up_down = model.predict(x[:, ::-1], batch_size=cfg.score.batch_size, verbose=0).ravel()
            flips_s = time.perf_counter() - start + plain_s
            result[split] = {"images": len(y), "auc_plain": round(metrics.roc_auc(y, plain), 4),
                             "auc_left_right": round(metrics.roc_auc(y, (plain + left_right) / 2), 4),
                             "auc_both_mirrors": round(metrics.roc_auc(y, (plain + left_right + up_down) / 3), 4),
                             "plain_s": round(plain_s, 3), "both_mirrors_s": round(flips_s, 3),
                             "ratio": round(plain_s / flips_s, 3)}
            order = np.argsort(ids)
            scored[split] = (np.asarray(ids)[order], y[order], plain[order])
        models[name] = {"best_epoch": record.get("best_epoch"), "seed": (record.get("hyperparameters") or {}).get("seed"),
                        **result}
        splits[name] = scored
    out = {"models": models}
    if len(names) > 1:
        first = splits[names[0]]
        same = all(np.array_equal(splits[n][s][0], first[s][0]) for n in names for s in first)
        out["ensemble"] = ({s: round(metrics.roc_auc(first[s][1], np.mean([splits[n][s][2] for n in names], axis=0)), 4)
                            for s in first} if same else "the models' splits differ: no ensemble")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
