"""A scikit-learn classifier around cnnbp's networks: ``cnnbp.sklearn.CNNClassifier``.

    from cnnbp.sklearn import CNNClassifier
    clf = CNNClassifier(input_shape=(1, 8, 8), epochs=25, random_state=0).fit(X, y)
    clf.predict(X_test); clf.predict_proba(X_test); clf.score(X_test, y_test)

It follows scikit-learn's estimator contract (``get_params``/``set_params``/``clone``,
``Pipeline``, ``GridSearchCV``, ``cross_val_score``, pickling), and trains with the pieces
``cnnbp train`` uses: the networks of ``train.ARCHITECTURES``, its optimizers and
schedules, ``data.DataLoader`` and ``Sequential.train_step``. Needs scikit-learn
(pip install "cnnbp[sklearn]").

X is (n, C, H, W) images, (n, H, W) one-channel images, or flat (n, features), which
``input_shape`` ((C, H, W) or (H, W)) reshapes into images; flat data without an
``input_shape`` is tabular, and a named ``module`` then becomes a small fully connected
network (Linear-ReLU-Linear, MLP_HIDDEN units). The labels may be of any type
(``classes_`` holds them sorted, as LabelEncoder); the network has one output per class and
is trained with cross-entropy, also for two classes.
"""

from __future__ import annotations

import copy
import numbers
import threading
from contextlib import contextmanager

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import (
        _check_partial_fit_first_call,
        check_classification_targets,
    )
    from sklearn.utils.validation import (
        _check_feature_names,
        check_array,
        check_consistent_length,
        check_is_fitted,
        column_or_1d,
    )
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        '[cnnbp.sklearn] scikit-learn is needed: pip install "cnnbp[sklearn]"'
    ) from error

from . import data, functional, get_num_threads, manual_seed, nn, set_num_threads, train

MLP_HIDDEN = 64  # hidden units of the network for tabular data
PREDICT_BATCH_SIZE = 1000

# cnnbp.manual_seed seeds one generator for the whole process: building a network draws
# from it, so two estimators fitted in threads of one process build theirs one at a time
_BUILD_LOCK = threading.Lock()


def build_mlp(input_shape, num_outputs, dtype=np.float32, hidden=MLP_HIDDEN):
    """Linear(features, hidden) -> ReLU -> Linear(hidden, num_outputs): for tabular data."""
    features = int(np.prod(input_shape))
    return nn.Sequential(
        nn.Linear(features, hidden, dtype=dtype),
        nn.ReLU(),
        nn.Linear(hidden, num_outputs, dtype=dtype),
    )


@contextmanager
def _threads(count):
    """The kernels' thread count set to `count` (None: unchanged) while inside."""
    if count is None:
        yield
        return
    before = get_num_threads()
    set_num_threads(count)
    try:
        yield
    finally:
        set_num_threads(before)


class CNNClassifier(ClassifierMixin, BaseEstimator):
    """A classifier that trains a cnnbp network with minibatch SGD (or Adam, AdamW).

    module: "cnn" or "resnet" (train.ARCHITECTURES, sized from the data), an nn.Module
        (a copy of it is trained), or a callable (input_shape, n_classes) -> nn.Module.
    input_shape: (C, H, W) or (H, W) that flat X is reshaped to; None keeps X's own shape.
    epochs, batch_size: passes over the data per fit, and images per step.
    optimizer, lr, momentum, weight_decay, schedule: as `cnnbp train` (train.OPTIMIZERS,
        train.SCHEDULES); momentum is used by "sgd" and "nesterov" only.
    dtype: "float32" or "float64", the dtype of the network and of X as it trains.
    threads: the kernels' threads during fit and predict (None: cnnbp's setting).
    random_state: None, an int or a RandomState; an int makes fit repeat bit for bit
        (the initial weights and every epoch's minibatch order come from it).
    verbose: > 0 prints each epoch's loss.
    warm_start: fit continues from the previous fit's network (as MLPClassifier's).

    Fitted attributes: classes_, n_features_in_ (values per sample), input_shape_ (what
    the network sees per sample), model_ (the nn.Module), n_iter_ (epochs trained),
    loss_curve_ (the mean training loss of each epoch), feature_names_in_ (DataFrames).
    """

    def __init__(
        self,
        module="cnn",
        input_shape=None,
        epochs=10,
        batch_size=32,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=0.0,
        schedule="constant",
        dtype="float32",
        threads=None,
        random_state=None,
        verbose=0,
        warm_start=False,
    ):
        self.module = module
        self.input_shape = input_shape
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.dtype = dtype
        self.threads = threads
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        tags.classifier_tags.multi_class = True
        return tags

    # ---- checks ------------------------------------------------------------------------

    def _check_params(self):
        name = type(self).__name__

        def integer(key, low):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"[{name}] {key}: expected an int >= {low}, got {value!r}")

        integer("epochs", 1)
        integer("batch_size", 1)
        if self.threads is not None:
            integer("threads", 1)
        if self.optimizer not in train.OPTIMIZERS:
            raise ValueError(
                f"[{name}] optimizer: expected one of {sorted(train.OPTIMIZERS)}, "
                f"got {self.optimizer!r}"
            )
        if self.schedule not in train.SCHEDULES:
            raise ValueError(
                f"[{name}] schedule: expected one of {sorted(train.SCHEDULES)}, "
                f"got {self.schedule!r}"
            )
        if np.dtype(self.dtype) not in (np.float32, np.float64):
            raise ValueError(f"[{name}] dtype: expected float32 or float64, got {self.dtype!r}")
        module = self.module
        if isinstance(module, str) and module not in train.ARCHITECTURES:
            raise ValueError(
                f"[{name}] module: expected one of {sorted(train.ARCHITECTURES)}, an "
                f"nn.Module or a callable, got {module!r}"
            )
        if not isinstance(module, (str, nn.Module)) and not callable(module):
            raise ValueError(
                f"[{name}] module: expected one of {sorted(train.ARCHITECTURES)}, an "
                f"nn.Module or a callable, got {type(module).__name__}"
            )

    def _sample_shape(self, X):
        """What the network sees per sample, for X as given to fit."""
        name = type(self).__name__
        if self.input_shape is not None:
            shape = tuple(int(v) for v in self.input_shape)
            if len(shape) == 2:
                shape = (1, *shape)
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(
                    f"[{name}] input_shape: expected (C, H, W) or (H, W) of positive "
                    f"sizes, got {self.input_shape!r}"
                )
            if int(np.prod(shape)) != int(np.prod(X.shape[1:])):
                raise ValueError(
                    f"[{name}] input_shape: expected {int(np.prod(shape))} values per "
                    f"sample for {self.input_shape!r}, got X of shape {X.shape}"
                )
            return shape
        if X.ndim == 3:
            return (1, *X.shape[1:])
        return tuple(X.shape[1:])  # (C, H, W), or (features,): tabular

    def _validate_X(self, X, reset):
        """X as a C-contiguous array of the network's input shape, with scikit-learn's
        checks (sparse matrices, NaN and infinity, a wrong feature count)."""
        _check_feature_names(self, X, reset=reset)
        X = check_array(
            X,
            accept_sparse=False,
            dtype=np.dtype(self.dtype),
            order="C",
            allow_nd=True,
            ensure_all_finite=True,
            estimator=self,
        )
        if X.ndim > 4:
            raise ValueError(
                f"[{type(self).__name__}] X: expected 2, 3 or 4 dims ((n, features), "
                f"(n, H, W) or (n, C, H, W)), got shape {X.shape}"
            )
        features = int(np.prod(X.shape[1:]))
        if reset:
            self.input_shape_ = self._sample_shape(X)
            self.n_features_in_ = features
        elif features != self.n_features_in_:
            raise ValueError(
                f"X has {features} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        elif X.ndim > 2 and self.input_shape is None:
            given = X.shape[1:] if X.ndim == 4 else (1, *X.shape[1:])
            if tuple(given) != tuple(self.input_shape_):
                raise ValueError(
                    f"[{type(self).__name__}] X: expected samples of shape "
                    f"{tuple(self.input_shape_)}, got X of shape {X.shape}"
                )
        return np.ascontiguousarray(X.reshape((X.shape[0], *self.input_shape_)))

    def _encode(self, y):
        """Class indices of y's labels in classes_; labels not in classes_ are refused."""
        index = np.searchsorted(self.classes_, y)
        index = np.clip(index, 0, len(self.classes_) - 1)
        unknown = self.classes_[index] != y
        if np.any(unknown):
            raise ValueError(
                f"[{type(self).__name__}] y: expected labels among classes_ "
                f"{self.classes_.tolist()}, got {np.unique(y[unknown]).tolist()}"
            )
        return index.astype(np.int64)

    # ---- the network -------------------------------------------------------------------

    def _build(self, seed):
        """The network for input_shape_ and classes_, with weights drawn from `seed`."""
        n_classes = len(self.classes_)
        dtype = np.dtype(self.dtype)
        module = self.module
        if isinstance(module, nn.Module):
            return copy.deepcopy(module)  # the given module stays as it was
        with _BUILD_LOCK:
            manual_seed(seed)
            if isinstance(module, str):
                if len(self.input_shape_) != 3:
                    return build_mlp(self.input_shape_, n_classes, dtype=dtype)
                return train.make_model(module, self.input_shape_, n_classes, dtype=dtype)
            return module(tuple(self.input_shape_), n_classes)

    def _make_optimizer(self):
        momentum = self.momentum if train.OPTIMIZERS[self.optimizer].uses_momentum else None
        return train.make_optimizer(
            self.optimizer,
            self.model_.parameters(),
            lr=self.lr,
            momentum=momentum,
            weight_decay=self.weight_decay,
        )

    def _run_epochs(self, X, y, epochs, scheduler):
        """`epochs` passes of minibatch training steps; appends each epoch's mean loss."""
        loader = data.DataLoader(
            X, y, batch_size=self.batch_size, shuffle=True, seed=self._random.integers(2**63)
        )
        loss_fn = nn.CrossEntropyLoss()
        self.model_.train()
        for _ in range(epochs):
            total = 0.0
            for xb, yb in loader:
                total += float(self.model_.train_step(xb, yb, loss_fn, self._optimizer)) * len(yb)
            if scheduler is not None:
                scheduler.step()
            self.n_iter_ += 1
            loss = total / len(y)
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"[{type(self).__name__}] loss: expected a finite value, got {loss} in "
                    f"epoch {self.n_iter_} (try a smaller lr)"
                )
            self.loss_curve_.append(loss)
            if self.verbose:
                print(f"epoch {self.n_iter_}, loss {loss:.6f}")
        self.model_.eval()

    def _fit(self, X, y, classes, incremental):
        self._check_params()
        first = not hasattr(self, "model_") or not (incremental or self.warm_start)
        X = self._validate_X(X, reset=first)
        y = column_or_1d(y, warn=True)
        check_consistent_length(X, y)
        check_classification_targets(y)
        name = type(self).__name__
        if first:
            self.classes_ = np.unique(classes if classes is not None else y)
            if len(self.classes_) < 2:
                raise ValueError(
                    f"[{name}] y: expected at least 2 classes, got 1 class "
                    f"({self.classes_.tolist()}): a classifier can't train on one class"
                )
            random = check_random_state(self.random_state)
            self._random = np.random.default_rng(random.randint(np.iinfo(np.int32).max))
            self.model_ = self._build(int(self._random.integers(2**63)))
            self.n_iter_ = 0
            self.loss_curve_ = []
            self._optimizer = None
        elif not incremental and not np.array_equal(np.unique(y), self.classes_):
            raise ValueError(
                f"[{name}] y: warm_start can only be used where y has the same classes as "
                f"in the previous call to fit: expected {self.classes_.tolist()}, "
                f"got {np.unique(y).tolist()}"
            )
        target = self._encode(y)
        with _threads(self.threads):
            if incremental:  # one epoch, the optimizer's state kept between calls
                if self._optimizer is None:
                    self._optimizer = self._make_optimizer()
                self._run_epochs(X, target, 1, None)
            else:
                self._optimizer = self._make_optimizer()
                scheduler = train.SCHEDULES[self.schedule](self._optimizer, self.epochs)
                self._run_epochs(X, target, self.epochs, scheduler)
        return self

    # ---- the estimator's methods -------------------------------------------------------

    def fit(self, X, y):
        """Train for `epochs` epochs: a new network, or with warm_start the fitted one."""
        return self._fit(X, y, classes=None, incremental=False)

    def partial_fit(self, X, y, classes=None):
        """One epoch over X, y; the first call needs every class in `classes`."""
        first = _check_partial_fit_first_call(self, classes)  # sets classes_ on the first
        if first:
            self.__dict__.pop("model_", None)  # a new network
        return self._fit(X, y, classes=self.classes_ if first else None, incremental=True)

    def decision_function(self, X):
        """The network's outputs (logits), (n, n_classes); for two classes the logit of
        classes_[1] minus that of classes_[0], (n,), as scikit-learn's binary classifiers."""
        logits = self._logits(X)
        if len(self.classes_) == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict_proba(self, X):
        """The softmax of the network's outputs, (n, n_classes), in float64."""
        return functional.softmax(self._logits(X), 1)

    def predict_log_proba(self, X):
        return functional.log_softmax(self._logits(X), 1)

    def predict(self, X):
        """The class of the largest output, as a label of classes_."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self._logits(X), axis=1)]

    def _logits(self, X):
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        out = np.empty((X.shape[0], len(self.classes_)), dtype=np.float64)
        self.model_.eval()
        with _threads(self.threads), nn.no_grad():
            for first in range(0, X.shape[0], PREDICT_BATCH_SIZE):
                out[first : first + PREDICT_BATCH_SIZE] = self.model_(
                    np.ascontiguousarray(X[first : first + PREDICT_BATCH_SIZE])
                )
        return out
