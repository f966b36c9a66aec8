"""Model selection: the best validation epoch's weights become the model, whatever ended training."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oncolake import selection, training


def _data(n, seed):
    """Bright images are malignant: a task one dense layer learns in an epoch."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = (rng.integers(0, 110, (n, 6, 6, 3)) + 120 * labels[:, None, None, None]).astype(np.uint8)
    return images, labels


def _model():
    import tensorflow as tf
    tf.keras.utils.set_random_seed(1)
    inputs = tf.keras.Input((6, 6, 3), dtype=tf.uint8)
    x = tf.keras.layers.Rescaling(1 / 255.0)(inputs)
    x = tf.keras.layers.Flatten()(x)
    outputs = tf.keras.layers.Dense(1, activation="sigmoid")(x)
    model = tf.keras.Model(inputs, outputs)
    model.compile(optimizer=tf.keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    return model


def test_the_best_epoch_is_kept_when_a_later_epoch_is_worse(tmp_path):
    import tensorflow as tf
    train_x, train_y = _data(256, 0)
    val_x, val_y = _data(64, 1)
    best_file = tmp_path / "best.weights.h5"

    class Sabotage(tf.keras.callbacks.Callback):
        """At the last epoch's end, flip the output: validation AUC becomes 1 - AUC < 0.5."""
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                kernel, bias = self.model.layers[-1].get_weights()
                self.model.layers[-1].set_weights([-kernel, -bias])
                self.sabotaged = self.model.get_weights()

    sabotage = Sabotage()
    chooser = selection.callback(val_x, val_y, save_best=lambda m: m.save_weights(best_file))
    model = _model()
    history = model.fit(train_x, train_y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                        callbacks=[sabotage, chooser])
    aucs = history.history["val_auc"]
    assert len(aucs) == 3 and aucs[2] < 0.5 < max(aucs[:2])
    assert chooser.best_epoch == int(np.argmax(aucs)) + 1 and chooser.best_epoch < 3
    # the model training ends with is the best checkpoint, not the last epoch's weights
    best = _model()
    best.load_weights(best_file)
    assert training.weights_digest(model) == training.weights_digest(best)
    assert training.weights_digest(model) != training.weights_digest(_with(sabotage.sabotaged))
    # and its AUC, computed independently, is the one the selection recorded
    rescored = roc_auc_score(val_y, model.predict(val_x, verbose=0).ravel())
    assert rescored == pytest.approx(chooser.best_val_auc, abs=1e-9)


def _with(weights):
    model = _model()
    model.set_weights(weights)
    return model


def test_weight_average_is_the_debiased_moving_average_of_every_step():
    import tensorflow as tf
    train_x, train_y = _data(128, 2)
    val_x, val_y = _data(64, 3)
    decay = 0.9
    seen = []

    class Record(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(self.model.get_weights())

    chooser = selection.callback(val_x, val_y, ema_decay=decay)
    model = _model()
    model.fit(train_x, train_y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Record(), chooser])
    expected = [w.astype(np.float64) for w in seen[0]]
    for n, weights in enumerate(seen[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    assert len(seen) == 8 and chooser.best_epoch == 1
    for got, want, last in zip(model.get_weights(), expected, seen[-1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, last)  # the average, not the last step's weights


def _batch_norm_statistics(model, images):
    """Each BatchNormalization layer's input mean and variance on ``images``, through Keras' own predict."""
    import tensorflow as tf
    stats = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            x = tf.keras.Model(model.inputs, layer.input).predict(images, verbose=0).astype(np.float64)
            stats.append((x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))))
    return stats


def _small_cnn(precision):
    import tensorflow as tf
    from oncolake.config import TrainConfig
    tf.keras.utils.set_random_seed(3)
    tcfg = TrainConfig(filters=(4, 8), dense_units=8, precision=precision)
    model = training.build_model(16, [120.0] * 3, [60.0] * 3, tcfg)
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_batch_norm_statistics_are_recomputed_on_the_inputs_they_normalise(precision):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 96)
    images = (rng.integers(0, 150, (96, 16, 16, 3)) + 100 * labels[:, None, None, None]).astype(np.uint8)
    model = _small_cnn(precision)
    model.fit(images, labels, batch_size=16, epochs=2, verbose=0)
    before = [(l.moving_mean.numpy(), l.moving_variance.numpy()) for l in model.layers
              if l.__class__.__name__ == "BatchNormalization"]
    assert selection.recalibrate_batch_norm(model, images, batch_size=40) == len(before) == 4
    after = [(l.moving_mean.numpy(), l.moving_variance.numpy()) for l in model.layers
             if l.__class__.__name__ == "BatchNormalization"]
    tolerance = 1e-4 if precision == "float32" else 2e-2  # bfloat16 activations: 8 bits of mantissa
    for (mean, var), (got_mean, got_var), (old_mean, old_var) in zip(_batch_norm_statistics(model, images),
                                                                     after, before):
        np.testing.assert_allclose(got_mean, mean, rtol=tolerance, atol=tolerance * np.sqrt(var).max())
        np.testing.assert_allclose(got_var, var, rtol=tolerance * 5, atol=1e-6)
        # two epochs of momentum 0.99 leave Keras' moving averages far from the real statistics
        assert np.abs(old_var - var).max() > 0.1 * var.max()


def test_the_selected_weights_carry_the_statistics_of_their_own_activations():
    train_x, train_y = _data(96, 5)
    val_x, val_y = _data(48, 6)
    images = np.repeat(np.repeat(train_x, 3, axis=1), 3, axis=2)[:, :16, :16]
    val = np.repeat(np.repeat(val_x, 3, axis=1), 3, axis=2)[:, :16, :16]
    chooser = selection.callback(val, val_y, ema_decay=0.9, bn_images=images)
    model = _small_cnn("float32")
    history = model.fit(images, train_y, batch_size=16, epochs=3, verbose=0, callbacks=[chooser])
    # the model training ends with (the best epoch's averaged weights) normalises with its own statistics
    for (mean, var), layer in zip(_batch_norm_statistics(model, images),
                                  [l for l in model.layers if l.__class__.__name__ == "BatchNormalization"]):
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-4 * np.sqrt(var).max())
        np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=5e-4, atol=1e-6)
    rescored = roc_auc_score(val_y, model.predict(val, verbose=0).ravel())
    assert rescored == pytest.approx(chooser.best_val_auc, abs=1e-9)
    assert history.history["val_auc"][chooser.best_epoch - 1] == chooser.best_val_auc


def test_recalibration_refuses_a_model_that_is_not_a_chain():
    import tensorflow as tf
    inputs = tf.keras.Input((4, 4, 3))
    a = tf.keras.layers.BatchNormalization()(inputs)
    b = tf.keras.layers.Conv2D(3, 1)(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="chain"):
        selection.recalibrate_batch_norm(model, np.zeros((2, 4, 4, 3), np.float32))
