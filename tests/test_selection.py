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
