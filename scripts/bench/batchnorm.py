"""BatchNormalization's moving statistics against recomputed ones, on real weights and tensors.

Loads a model (``--model``, a registered ``model.keras``) with a checkpoint's
weights (``--weights``, e.g. a run folder's ``last.weights.h5``), reads the
tensor dataset's training and validation splits (``--tensors``, a
``silver/tensors/<dataset>/v<N>`` folder), and reports, for each
BatchNormalization layer, its moving variance against the real variance of
its input on the training images (median ratio), and the validation ROC AUC
in inference mode with Keras' moving statistics and after
``selection.recalibrate_batch_norm`` on ``train.bn_images`` training images.
Its cost is given next to its baseline, one inference pass over the
validation split, in the same process.

One JSON line.

    scripts/bench.sh batchnorm --model M.keras --weights W.h5 --tensors DIR
"""
import time

import numpy as np

from oncolake import cli, evaluation, metrics, selection


def main(argv=None) -> int:
    p = cli.parser("bench-batchnorm", __doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--tensors", required=True)
    args = p.parse_args(argv)
    return cli.run_bench("bench-batchnorm", args, lambda spark, cfg, work: _measure(cfg, args))


def _measure(cfg, args) -> dict:
    import tensorflow as tf
    base = args.tensors if "://" in args.tensors else f"file://{args.tensors}"
    _, train_x, _ = evaluation.read_split(f"{base}/split=train", limit=cfg.train.bn_images, seed=cfg.train.seed)
    _, val_x, val_y = evaluation.read_split(f"{base}/split=val")
    model = tf.keras.models.load_model(args.model, compile=False)
    model.load_weights(args.weights)
    norms = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]

    def variance_ratios():
        ratios = {}
        for layer in norms:
            x = tf.keras.Model(model.inputs, layer.input).predict(train_x, verbose=0).astype(np.float64)
            ratios[layer.name] = round(float(np.median(layer.moving_variance.numpy() / x.var(axis=(0, 1, 2)))), 3)
        return ratios

    def validation():
        start = time.perf_counter()
        scores = model.predict(val_x, batch_size=2 * cfg.train.batch_size, verbose=0).ravel()
        return metrics.roc_auc(val_y, scores), time.perf_counter() - start

    model.predict(val_x[:8], verbose=0)  # warm-up: traces the graph
    moving_ratios = variance_ratios()
    moving_auc, predict_s = validation()
    start = time.perf_counter()
    selection.recalibrate_batch_norm(model, train_x, batch_size=2 * cfg.train.batch_size)
    recalibrate_s = time.perf_counter() - start
    recomputed_auc, _ = validation()
    return {"train_images": len(train_x), "val_images": len(val_x),
            "moving_over_real_variance_median": moving_ratios,
            "recomputed_over_real_variance_median": variance_ratios(),
            "val_auc_moving_statistics": round(moving_auc, 4),
            "val_auc_recomputed_statistics": round(recomputed_auc, 4),
            "recalibration_s": round(recalibrate_s, 2), "validation_predict_s": round(predict_s, 2),
            "ratio": round(recalibrate_s / predict_s, 2)}


if __name__ == "__main__":
    raise SystemExit(main())
