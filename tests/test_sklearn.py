"""cnnbp.sklearn.CNNClassifier: scikit-learn's own estimator checks, image input, labels,
reproducibility, warm starts, pickling, parallel model selection and bad input."""

import copy
import functools
import pickle

import cnnbp
import joblib
import numpy as np
import pytest
import scipy.sparse
from cnnbp import data, nn
from cnnbp.sklearn import CNNClassifier
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils.estimator_checks import parametrize_with_checks

CLI_ACCURACY = 350 / 359  # `cnnbp train` (the cnn, 25 epochs) on the same split


@parametrize_with_checks([CNNClassifier(epochs=3)], expected_failed_checks=lambda est: {})
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _images(n=60, shape=(1, 6, 6), classes=3, seed=0):
    """Images whose class is the bright quadrant: easy to learn in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(0, 0.1, (n, *shape))
    h, w = shape[1] // 2, shape[2] // 2
    for i, label in enumerate(y):
        x[i, :, (label // 2) * h : (label // 2 + 1) * h, (label % 2) * w : (label % 2 + 1) * w] += 1
    return x.astype(np.float32), y


def _same_fit(a, b):
    assert a.loss_curve_ == b.loss_curve_
    for p, q in zip(a.model_.parameters(), b.model_.parameters()):
        assert np.array_equal(p.data, q.data)


def test_image_forms_train_the_same_network():
    x, y = _images()
    nchw = CNNClassifier(epochs=2, random_state=0).fit(x, y)
    nhw = CNNClassifier(epochs=2, random_state=0).fit(x[:, 0], y)
    flat = CNNClassifier(epochs=2, random_state=0, input_shape=(6, 6)).fit(x.reshape(60, -1), y)
    for clf in (nchw, nhw, flat):
        assert clf.input_shape_ == (1, 6, 6) and clf.n_features_in_ == 36
        assert isinstance(clf.model_[0], nn.Conv2d)  # the CLI's cnn, sized from the data
    _same_fit(nchw, nhw)
    _same_fit(nchw, flat)
    assert np.array_equal(nchw.predict_proba(x), flat.predict_proba(x.reshape(60, -1)))
    assert np.array_equal(nchw.predict(x[:, 0]), nchw.predict(x))  # any form at predict


def test_fit_is_reproducible_bit_for_bit_and_seeds_differ():
    x, y = _images()
    a = CNNClassifier(epochs=2, random_state=3).fit(x, y)
    b = CNNClassifier(epochs=2, random_state=3).fit(x, y)
    _same_fit(a, b)
    assert np.array_equal(a.predict_proba(x), b.predict_proba(x))
    c = CNNClassifier(epochs=2, random_state=4).fit(x, y)
    assert a.loss_curve_ != c.loss_curve_


def test_labels_of_any_type_and_the_outputs():
    x, y = _images(classes=3)
    names = np.array(["cat", "dog", "emu"], dtype=object)[y]
    clf = CNNClassifier(epochs=4, random_state=0, lr=0.1).fit(x, names)
    assert clf.classes_.tolist() == ["cat", "dog", "emu"]
    assert set(clf.predict(x)) <= set(clf.classes_) and clf.score(x, names) > 0.9
    proba = clf.predict_proba(x)
    assert proba.shape == (60, 3) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    assert np.array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(x))
    assert clf.decision_function(x).shape == (60, 3)
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(x)), proba, rtol=1e-10)
    assert clf.n_iter_ == 4 and len(clf.loss_curve_) == 4


def test_two_classes_decision_function_is_the_log_odds():
    x, y = _images(classes=2)
    clf = CNNClassifier(epochs=3, random_state=0).fit(x, np.where(y == 1, "yes", "no"))
    decision = clf.decision_function(x)
    assert decision.shape == (60,)
    proba = clf.predict_proba(x)
    np.testing.assert_allclose(decision, np.log(proba[:, 1] / proba[:, 0]), rtol=1e-6, atol=1e-9)
    assert np.array_equal(clf.predict(x), np.where(decision > 0, "yes", "no"))


def test_modules_resnet_a_module_and_a_callable():
    x, y = _images(shape=(1, 4, 4))
    resnet = CNNClassifier(module="resnet", epochs=1, random_state=0).fit(x, y)
    assert any(isinstance(m, nn.Residual) for m in resnet.model_)
    cnnbp.manual_seed(0)
    given = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    before = given.state_dict()
    clf = CNNClassifier(module=given, epochs=2, random_state=0).fit(x, y)
    assert clf.model_ is not given  # a copy is trained; the parameter is unchanged
    assert all(np.array_equal(v, given.state_dict()[k]) for k, v in before.items())
    seen = []

    def build(input_shape, n_classes):
        seen.append((input_shape, n_classes))
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), n_classes))

    CNNClassifier(module=build, epochs=1).fit(x, y)
    assert seen == [((1, 4, 4), 3)]
    flat = CNNClassifier(epochs=1).fit(x.reshape(60, -1), y)  # tabular: a small MLP
    assert [type(m).__name__ for m in flat.model_] == ["Linear", "ReLU", "Linear"]


def test_float64_and_threads():
    x, y = _images()
    before = cnnbp.get_num_threads()
    clf = CNNClassifier(epochs=1, dtype="float64", threads=1, random_state=0).fit(x, y)
    assert clf.model_.parameters()[0].dtype == np.float64
    assert cnnbp.get_num_threads() == before
    other = CNNClassifier(epochs=1, dtype="float64", threads=2, random_state=0).fit(x, y)
    _same_fit(clf, other)  # results do not depend on the thread count


def test_warm_start_continues_as_mlp():
    x, y = _images()
    clf = CNNClassifier(epochs=2, random_state=0, warm_start=True).fit(x, y)
    first = [p.data.copy() for p in clf.model_.parameters()]
    clf.fit(x, y)
    assert clf.n_iter_ == 4 and len(clf.loss_curve_) == 4
    assert clf.loss_curve_[:2] == CNNClassifier(epochs=2, random_state=0).fit(x, y).loss_curve_
    assert not np.array_equal(first[0], clf.model_.parameters()[0].data)
    with pytest.raises(ValueError, match="same classes"):
        clf.fit(x, (y + 1) % 4)
    cold = clone(clf).set_params(warm_start=False).fit(x, y)
    assert cold.n_iter_ == 2


def test_partial_fit():
    x, y = _images()
    clf = CNNClassifier(random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(x, y)
    clf.partial_fit(x[:30], y[:30], classes=[0, 1, 2, 3])
    clf.partial_fit(x[30:], y[30:])
    assert clf.n_iter_ == 2 and clf.classes_.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"\[CNNClassifier\] y: expected labels among"):
        clf.partial_fit(x, y + 4)
    # partial_fit keeps the optimizer's state: a pickled copy continues bit for bit
    copied = pickle.loads(pickle.dumps(clf))
    clf.partial_fit(x, y)
    copied.partial_fit(x, y)
    _same_fit(clf, copied)


def test_pickle_and_joblib_round_trips(tmp_path):
    x, y = _images()
    clf = CNNClassifier(epochs=2, random_state=0).fit(x, y)
    for restored in (
        pickle.loads(pickle.dumps(clf)),
        copy.deepcopy(clf),
        joblib.load(joblib.dump(clf, tmp_path / "clf.joblib")[0]),
    ):
        assert np.array_equal(restored.predict_proba(x), clf.predict_proba(x))
        assert restored.get_params() == clf.get_params()
    unfitted = pickle.loads(pickle.dumps(CNNClassifier(lr=0.3)))
    assert unfitted.lr == 0.3


def test_clone_copies_a_module_parameter():
    module = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    clf = CNNClassifier(module=module, lr=0.1)
    twin = clone(clf)
    assert twin.module is not module and twin.get_params()["lr"] == 0.1
    assert np.array_equal(twin.module[1].weight.data, module[1].weight.data)
    assert clf.set_params(epochs=7).epochs == 7


def test_pipeline_grid_search_on_the_digits_reaches_the_cli_accuracy():
    digits = load_digits()
    (x_train, y_train), (x_test, y_test) = data.train_test_split(
        digits.data, digits.target, test_fraction=0.2, seed=0
    )  # `cnnbp train`'s split
    pipeline = Pipeline(
        [
            ("scale", FunctionTransformer(functools.partial(np.multiply, 1 / 16))),
            ("cnn", CNNClassifier(input_shape=(1, 8, 8), threads=1, random_state=0)),
        ]
    )
    search = GridSearchCV(
        pipeline, {"cnn__lr": [0.02, 0.05], "cnn__epochs": [5, 10]}, cv=3, n_jobs=2
    )
    search.fit(x_train, y_train)
    assert search.best_estimator_.score(x_test, y_test) >= CLI_ACCURACY


def test_cross_val_score_in_two_processes():
    x, y = _images(n=90)
    clf = CNNClassifier(epochs=8, random_state=0)
    scores = cross_val_score(clf, x, y, cv=3, n_jobs=2)
    assert scores.shape == (3,) and scores.min() > 0.8
    assert np.array_equal(scores, cross_val_score(clf, x, y, cv=3))  # as in one process


def test_bad_input_gets_scikit_learns_errors():
    x, y = _images()
    clf = CNNClassifier(epochs=1)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clf.fit(bad, y)
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        clf.fit(bad, y)
    with pytest.raises(TypeError, match="Sparse data was passed"):
        clf.fit(scipy.sparse.csr_matrix(x.reshape(60, -1)), y)
    with pytest.raises(ValueError, match="only one class|1 class"):
        clf.fit(x, np.zeros(60, dtype=int))
    with pytest.raises(ValueError, match="Unknown label type"):
        clf.fit(x, np.linspace(0, 1, 60))
    clf.fit(x, y)
    with pytest.raises(ValueError, match="X has 35 features, but CNNClassifier is expecting 36"):
        clf.predict(x.reshape(60, -1)[:, :35])
    with pytest.raises(ValueError, match=r"expected samples of shape \(1, 6, 6\)"):
        clf.predict(x.reshape(60, 1, 4, 9))
    with pytest.raises(ValueError, match=r"\[CNNClassifier\] input_shape: expected 25 values"):
        CNNClassifier(input_shape=(1, 5, 5)).fit(x.reshape(60, -1), y)
    for params, message in [
        ({"epochs": 0}, r"epochs: expected an int >= 1, got 0"),
        ({"module": "vgg"}, r"module: expected one of \['cnn', 'resnet'\]"),
        ({"optimizer": "rmsprop"}, "optimizer: expected one of"),
        ({"schedule": "linear"}, "schedule: expected one of"),
        ({"dtype": "float16"}, "dtype: expected float32 or float64"),
    ]:
        with pytest.raises(ValueError, match=message):
            CNNClassifier(**params).fit(x, y)
