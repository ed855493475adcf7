"""Identity-leakage probes on frozen motion features (paper sec. 4.3, Table 2 exp. A / Table 5).

What is measured. A motion encoder should pass on *how* the driving character moves, not *who*
it is. We freeze the encoder, collect one feature vector per driving frame (e.g. the 1D tokens
[N_m, C_m] of the motion tokenizer, or the 2D grid [(H/s)*(W/s), C] of the conv baseline, flattened)
and fit linear (ridge) probes that try to read the driving identity back out:

* `shape_r2`: ridge regression onto the driving identity's body-shape parameters; held-out R^2
  (sklearn's definition, uniform average over the shape dimensions). ~1: shape is linearly
  decodable from the motion features (leakage); <= 0: no better than predicting the fit mean.
* `id_accuracy`: ridge regression onto the one-hot identity id, classified by argmax; held-out
  accuracy against `id_chance` = 1 / number of identities in the fit set.

The paper's claim is lower leakage for the 1D tokens than for 2D/conv features.

Split protocol (the caller's job). Fit and test sets must share identities but differ in
*motions*: e.g. for every identity, frames of some motion clips go to the fit set and frames of
other clips to the test set. An identity can only be classified if it was seen at fit time, and
because every test motion is new, a correct prediction means identity information that survives
a change of motion, not memorised frame/pose appearance. (Splitting by frame would let the probe
match near-duplicate poses of adjacent frames; splitting by identity would make identity accuracy
meaningless.) This module does not build that split: it only receives the two sets.

The ridge penalty of each probe is chosen on a validation split carved from the FIT set only
(deterministically: whole `groups_fit` groups, e.g. motion ids, so validation mirrors the
held-out-motion protocol; without groups every 5th sample); the test set is touched exactly once,
by the final probe refitted on the whole fit set.

Ridge details: features are standardised with the fit set's mean/std (zero-variance columns are
dropped: they get zero weight, whatever their value at predict time), the intercept is not
penalised (centred targets), and the normal equations are solved in the dual (N x N Gram) form
when N < D, in the primal (D x D) form otherwise, via one eigendecomposition that serves every
penalty and target. Everything is numpy float64.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

DEFAULT_LAMS = (1e-2, 1e-1, 1e0, 1e1, 1e2, 1e3, 1e4)
SOLVERS = ("auto", "primal", "dual")
VAL_EVERY = 5  # validation takes every 5th sample, or every 5th group (sorted group values)


@dataclasses.dataclass(frozen=True)
class RidgeModel:
    """y ~= ((x - mean) * inv_std) @ coef + intercept. inv_std is 0 on zero-variance columns."""
    mean: np.ndarray       # [D]
    inv_std: np.ndarray    # [D]
    coef: np.ndarray       # [D, K] (zero rows for dropped columns)
    intercept: np.ndarray  # [K]
    lam: float
    solver: str            # the form actually used: "primal" or "dual"
    squeeze: bool          # y was 1-D at fit time: predictions are 1-D too


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a leading sample axis, got a scalar")
    x = x.reshape(x.shape[0], -1)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values")
    return x


def rounding_tolerance(x) -> float:
    """Relative spread under which a column of `x` counts as constant: 1e-12 for float64 inputs,
    8 ulps of their own precision for narrower ones (float32: 9.5e-7)."""
    dtype = np.asarray(x).dtype
    eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else 0.0
    return max(1e-12, 8 * float(eps))


class _Design:
    """A standardised design matrix and the eigendecomposition of its smaller Gram matrix."""

    def __init__(self, x: np.ndarray, solver: str = "auto", rel_tol: float = 1e-12):
        if solver not in SOLVERS:
            raise ValueError(f"solver {solver!r} not in {SOLVERS}")
        x = _as_2d(x, "features")
        n, d = x.shape
        if n < 2:
            raise ValueError(f"ridge needs at least 2 fit samples, got {n}")
        self.mean = x.mean(0)
        std = x.std(0)
        # Constant columns (up to the inputs' rounding, relative to the column's magnitude) carry
        # no signal: standardised, rounding residue would read as a feature.
        keep = std > rel_tol * np.maximum(np.abs(x).max(0), np.finfo(np.float64).tiny)
        self.inv_std = np.where(keep, 1.0 / np.where(keep, std, 1.0), 0.0)
        self.keep = keep
        self.z = (x[:, keep] - self.mean[keep]) * self.inv_std[keep]  # [N, D_kept]
        self.dim = d
        # "Cheaper" counts the columns actually kept.
        self.solver = solver if solver != "auto" else ("dual" if n < self.z.shape[1] else "primal")
        gram = self.z @ self.z.T if self.solver == "dual" else self.z.T @ self.z
        evals, self.evecs = np.linalg.eigh(gram)
        evals = np.clip(evals, 0.0, None)
        # Directions with (numerically) zero eigenvalue are dropped, as in a pseudo-inverse: this
        # makes lam -> 0 continuous with the minimum-norm least-squares solution at lam = 0.
        top = evals.max() if evals.size else 0.0
        tol = top * max(gram.shape + (1,)) * np.finfo(np.float64).eps
        self.evals, self.nonzero = evals, evals > tol

    def coef(self, y: np.ndarray, lam: float) -> tuple:
        """Ridge coefficients [D, K] (standardised units) and intercept [K] for targets y [N, K]."""
        if not lam >= 0:
            raise ValueError(f"ridge penalty must be >= 0, got {lam}")
        y_mean = y.mean(0)
        yc = y - y_mean
        inv = np.where(self.nonzero, 1.0 / np.where(self.nonzero, self.evals + lam, 1.0), 0.0)
        v = self.evecs
        if self.solver == "dual":  # alpha = (Z Z^T + lam I)^-1 y,  w = Z^T alpha
            w_kept = self.z.T @ (v @ (inv[:, None] * (v.T @ yc)))
        else:  # w = (Z^T Z + lam I)^-1 Z^T y
            w_kept = v @ (inv[:, None] * (v.T @ (self.z.T @ yc)))
        w = np.zeros((self.dim, y.shape[1]))
        w[self.keep] = w_kept
        return w, y_mean

    def model(self, y: np.ndarray, lam: float, squeeze: bool = False) -> RidgeModel:
        w, b = self.coef(y, lam)
        return RidgeModel(self.mean, self.inv_std, w, b, float(lam), self.solver, squeeze)


def ridge_fit(x, y, lam: float, solver: str = "auto") -> RidgeModel:
    """Ridge regression of y [N] or [N, K] on x [N, ...] (trailing axes flattened).

    Minimises ||y - Z w - b||^2 + lam ||w||^2 with Z the fit-standardised x and b unpenalised.
    `solver`: "auto" (dual when N < D, else primal), or force "primal" / "dual" (same solution).
    lam = 0 gives the minimum-norm least-squares solution in standardised units.
    """
    x2, tol = _as_2d(x, "features"), rounding_tolerance(x)
    y_arr = np.asarray(y, dtype=np.float64)
    if y_arr.shape[:1] != x2.shape[:1]:
        raise ValueError(f"features have {x2.shape[0]} samples but targets {y_arr.shape[:1]}")
    y2 = _as_2d(y_arr, "targets")
    return _Design(x2, solver, tol).model(y2, lam, squeeze=y_arr.ndim == 1)


def ridge_predict(model: RidgeModel, x) -> np.ndarray:
    """Predictions [N, K] (or [N] if the model was fit on 1-D targets) for features x [N, ...]."""
    x2 = _as_2d(x, "features")
    if x2.shape[1] != model.mean.shape[0]:
        raise ValueError(f"features have dim {x2.shape[1]}, the model was fit on "
                         f"{model.mean.shape[0]}")
    pred = ((x2 - model.mean) * model.inv_std) @ model.coef + model.intercept
    return pred[:, 0] if model.squeeze else pred


def r2_score(y_true, y_pred) -> float:
    """sklearn's r2_score(multioutput="uniform_average"): the mean over outputs of
    1 - SS_res / SS_tot; an output with constant truth scores 1 if predicted exactly, else 0."""
    t, p = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ")
    ss_res = ((t - p) ** 2).sum(0)
    ss_tot = ((t - t.mean(0)) ** 2).sum(0)
    ok = ss_tot > 0
    scores = np.where(ok, 1.0 - ss_res / np.where(ok, ss_tot, 1.0), np.where(ss_res == 0, 1.0, 0.0))
    return float(scores.mean())


def validation_split(num: int, groups: np.ndarray | None = None) -> tuple:
    """Deterministic (train_idx, val_idx) over range(num), used to choose the ridge penalty.

    With `groups` ([num], e.g. motion ids): every 5th of the sorted distinct groups (starting with
    the first) is held out whole, so no group straddles the split. Without: samples 4, 9, 14, ...
    Both parts are non-empty (needs num >= 2, or >= 2 distinct groups).
    """
    idx = np.arange(num)
    if groups is None:
        if num < 2:
            raise ValueError(f"validation split needs at least 2 fit samples, got {num}")
        val = idx % VAL_EVERY == VAL_EVERY - 1
        if not val.any():
            val = idx == num - 1
    else:
        groups = np.asarray(groups)
        if groups.shape != (num,):
            raise ValueError(f"groups_fit must have shape ({num},), got {groups.shape}")
        distinct = np.unique(groups)
        if distinct.size < 2:
            raise ValueError("validation split by groups needs at least 2 distinct groups")
        val = np.isin(groups, distinct[::VAL_EVERY])
    return idx[~val], idx[val]


def _one_hot(ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """[N, C] one-hot over `classes` (sorted); ids not in `classes` get an all-zero row."""
    pos = np.searchsorted(classes, ids)
    pos = np.clip(pos, 0, classes.size - 1)
    hit = classes[pos] == ids
    out = np.zeros((ids.shape[0], classes.size))
    out[np.arange(ids.shape[0])[hit], pos[hit]] = 1.0
    return out


def _id_scores(pred: np.ndarray, ids: np.ndarray, classes: np.ndarray) -> tuple:
    """(accuracy, mean squared error to the one-hot) of one-hot regression outputs [N, C]."""
    acc = float(np.mean(classes[np.argmax(pred, axis=1)] == ids))
    mse = float(np.mean((pred - _one_hot(ids, classes)) ** 2))
    return acc, mse


def probe(features_fit, shape_fit, id_fit, features_test, shape_test, id_test,
          lams: Sequence[float] = DEFAULT_LAMS, groups_fit=None) -> dict:
    """Fit ridge probes on (features_fit -> shape_fit, id_fit) and score them on the test set.

    features_* [N, ...] (trailing axes flattened to D), shape_* [N, S] or [N] body-shape
    parameters of the driving identity, id_* [N] identity labels (any sortable values),
    groups_fit [N] optional validation groups (e.g. motion ids). See the module docstring for the
    split protocol the caller must follow. Test identities unseen at fit time count as errors.

    Returns shape_r2, id_accuracy, id_chance, lam_shape, lam_id (each chosen on the fit set's
    validation split: max R^2, resp. max accuracy then min one-hot MSE; ties -> the larger
    penalty), val_shape_r2, val_id_accuracy, num_fit, num_test, num_classes, dim, solver.
    """
    lams = tuple(float(x) for x in lams)
    if not lams or min(lams) < 0:
        raise ValueError(f"lams must be a non-empty sequence of penalties >= 0, got {lams}")
    x_fit, x_test = _as_2d(features_fit, "features_fit"), _as_2d(features_test, "features_test")
    tol = rounding_tolerance(features_fit)
    s_fit, s_test = _as_2d(shape_fit, "shape_fit"), _as_2d(shape_test, "shape_test")
    id_fit, id_test = np.asarray(id_fit).reshape(-1), np.asarray(id_test).reshape(-1)
    n_fit, n_test = x_fit.shape[0], x_test.shape[0]
    if x_fit.shape[1] != x_test.shape[1]:
        raise ValueError(f"fit features have dim {x_fit.shape[1]}, test {x_test.shape[1]}")
    if s_fit.shape[1] != s_test.shape[1]:
        raise ValueError(f"fit shapes have dim {s_fit.shape[1]}, test {s_test.shape[1]}")
    for name, arr, n in (("shape_fit", s_fit, n_fit), ("id_fit", id_fit, n_fit),
                         ("shape_test", s_test, n_test), ("id_test", id_test, n_test)):
        if arr.shape[0] != n:
            raise ValueError(f"{name} has {arr.shape[0]} samples, its features {n}")
    classes = np.unique(id_fit)
    num_s = s_fit.shape[1]

    # Choose each penalty on a validation split of the fit set (the test set is not read here).
    tr, va = validation_split(n_fit, groups_fit)
    design = _Design(x_fit[tr], rel_tol=tol)
    y_tr = np.concatenate([s_fit[tr], _one_hot(id_fit[tr], classes)], axis=1)
    z_va = (x_fit[va] - design.mean) * design.inv_std
    best_shape, best_id = None, None
    for lam in sorted(lams):  # ascending, so ">=" below prefers the larger penalty on ties
        w, b = design.coef(y_tr, lam)
        pred = z_va @ w + b
        r2 = r2_score(s_fit[va], pred[:, :num_s])
        acc, mse = _id_scores(pred[:, num_s:], id_fit[va], classes)
        if best_shape is None or r2 >= best_shape[0]:
            best_shape = (r2, lam)
        if best_id is None or (acc, -mse) >= best_id[:2]:
            best_id = (acc, -mse, lam)
    lam_shape, lam_id = best_shape[1], best_id[2]

    # Refit on the whole fit set with the chosen penalties; score on the test set once.
    design = _Design(x_fit, rel_tol=tol)
    shape_model = design.model(s_fit, lam_shape)
    id_model = design.model(_one_hot(id_fit, classes), lam_id)
    shape_r2 = r2_score(s_test, ridge_predict(shape_model, x_test))
    id_acc, _ = _id_scores(ridge_predict(id_model, x_test), id_test, classes)
    return dict(shape_r2=shape_r2, id_accuracy=id_acc, id_chance=1.0 / classes.size,
                lam_shape=lam_shape, lam_id=lam_id, val_shape_r2=best_shape[0],
                val_id_accuracy=best_id[0], num_fit=int(n_fit), num_test=int(n_test),
                num_classes=int(classes.size), dim=int(x_fit.shape[1]), solver=design.solver)
