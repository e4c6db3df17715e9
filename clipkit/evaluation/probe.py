"""Linear and few-shot probes on frozen image features (the paper's protocol, at small scale).

Multinomial logistic regression with scikit-learn's L-BFGS on L2-normalised features. The inverse
regularisation C is chosen on a held-out part of the training split, then the probe is refit on all of it.
Written against scikit-learn rather than torch because it is the solver the paper used and already a dependency.
"""

from __future__ import annotations

import warnings

import numpy as np

C_GRID = tuple(float(c) for c in np.logspace(-2, 4, 7))  # 0.01 ... 10,000


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the cost; accuracy is what we report
        warnings.filterwarnings("ignore", message="The number of unique classes")  # 1-shot: one image per class
        return LogisticRegression(C=c, solver="lbfgs", max_iter=1000).fit(x, y)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): ``fraction`` of each class (at least one when it has two) held out."""
    rng, train, val = np.random.default_rng(seed), [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.array(sorted(train)), np.array(sorted(val))


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, c_grid: tuple[float, ...] = C_GRID,
              val_fraction: float = 0.2, seed: int = 0) -> tuple[object, float, dict[float, float]]:
    """Sweep C on a stratified validation split of the training features, refit on all of them:
    (the probe, its C, validation top-1 by C). The probe takes raw features (it normalises them itself)."""
    train_x = _normalise(train_x)
    fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
    val_acc = {c: float((_fit(train_x[fit_idx], train_y[fit_idx], c).predict(train_x[val_idx]) == train_y[val_idx]).mean())
               for c in c_grid}
    best = max(c_grid, key=lambda c: (val_acc[c], -abs(np.log10(c))))  # ties: the least extreme C
    return _Normalised(_fit(train_x, train_y, best)), best, val_acc


class _Normalised:
    """A fitted probe that L2-normalises what it is asked to predict, as it was trained."""

    def __init__(self, model) -> None:
        self.model = model

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.model.predict(_normalise(x)) == y).mean())


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 c_grid: tuple[float, ...] = C_GRID, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """:func:`fit_probe`, then top-1 on the test set."""
    probe, best, val_acc = fit_probe(train_x, train_y, c_grid, val_fraction, seed)
    return {"top1": probe.accuracy(test_x, test_y), "C": best,
            "validation_top1": {f"{c:g}": v for c, v in val_acc.items()}}


def few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             ks: tuple[int, ...] = (1, 2, 4, 8, 16), seeds: tuple[int, ...] = (0, 1, 2), c: float = 1.0) -> dict:
    """k images per class drawn from the training split (per seed), a probe with fixed C, test top-1.

    With one image per class there is nothing to validate C on, so every k uses the same ``c`` (pass the
    full linear probe's choice); classes with fewer than k images use all they have.
    """
    train_x, test_x = _normalise(train_x), _normalise(test_x)
    out = {}
    for k in ks:
        accs = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            idx = np.concatenate([rng.permutation(np.flatnonzero(train_y == cls))[:k] for cls in np.unique(train_y)])
            accs.append(float((_fit(train_x[idx], train_y[idx], c).predict(test_x) == test_y).mean()))
        out[f"{k}_shot"] = {"top1": float(np.mean(accs)), "std": float(np.std(accs)), "per_seed": accs}
    return out
