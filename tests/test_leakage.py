"""Identity-leakage probes: ridge maths, R^2, validation protocol, and probes with known answers."""
import numpy as np
import pytest

from im_anim_jax.evaluation import leakage

NUM_IDS, NUM_MOTIONS, FRAMES, SHAPE_DIM = 6, 10, 4, 3
FIT_MOTIONS = 7  # motions 0-6 fit, 7-9 test: shared identities, unseen motions


def _dataset(dim, signal, seed=0):
    """Frames of every (identity, motion) pair; features = signal * (shape, identity code) mixed
    into `dim` dims + a per-motion pose component + noise. Returns fit and test dicts."""
    rng = np.random.default_rng(seed)
    shapes = rng.normal(size=(NUM_IDS, SHAPE_DIM))
    id_code = rng.normal(size=(NUM_IDS, 8))
    ident, motion = np.meshgrid(np.arange(NUM_IDS), np.arange(NUM_MOTIONS), indexing="ij")
    ident = np.repeat(ident.ravel(), FRAMES)
    motion = np.repeat(motion.ravel(), FRAMES)
    pose = rng.normal(size=(NUM_MOTIONS, FRAMES, 5))[motion, np.arange(motion.size) % FRAMES]
    latent = np.concatenate([shapes[ident], id_code[ident]], 1)
    x = (signal * latent @ rng.normal(size=(latent.shape[1], dim))
         + pose @ rng.normal(size=(5, dim)) + 0.3 * rng.normal(size=(ident.size, dim)))
    fit = motion < FIT_MOTIONS
    return tuple(dict(x=x[m], shape=shapes[ident[m]], ids=ident[m], motion=motion[m])
                 for m in (fit, ~fit))


def _probe(fit, test, **kw):
    return leakage.probe(fit["x"], fit["shape"], fit["ids"], test["x"], test["shape"], test["ids"],
                         groups_fit=fit["motion"], **kw)


@pytest.mark.parametrize("dim", [40, 400])  # 400 > 168 fit samples: the dual path
def test_linear_identity_features_leak(dim):
    fit, test = _dataset(dim, signal=1.0)
    out = _probe(fit, test)
    assert out["solver"] == ("primal" if dim == 40 else "dual")
    assert out["num_fit"] == 168 and out["num_test"] == 72 and out["dim"] == dim
    assert out["id_chance"] == pytest.approx(1 / NUM_IDS) and out["num_classes"] == NUM_IDS
    assert out["shape_r2"] > 0.95, out
    assert out["id_accuracy"] > 0.95, out
    assert out["lam_shape"] in leakage.DEFAULT_LAMS and out["lam_id"] in leakage.DEFAULT_LAMS


@pytest.mark.parametrize("dim", [40, 400])
def test_pure_noise_features_do_not_leak(dim):
    fit, test = _dataset(dim, signal=0.0, seed=1)
    out = _probe(fit, test)
    assert out["shape_r2"] <= 0.02, out
    assert out["id_accuracy"] < out["id_chance"] + 0.12, out


def test_ridge_matches_lstsq_as_lam_goes_to_zero():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8)) * rng.uniform(0.1, 10, 8), rng.normal(size=(50, 2))
    x_new = rng.normal(size=(7, 8))
    design = np.concatenate([x, np.ones((50, 1))], 1)
    sol = np.linalg.lstsq(design, y, rcond=None)[0]
    want = np.concatenate([x_new, np.ones((7, 1))], 1) @ sol
    for lam in (0.0, 1e-10):
        model = leakage.ridge_fit(x, y, lam)
        assert model.solver == "primal"
        np.testing.assert_allclose(leakage.ridge_predict(model, x_new), want, rtol=1e-7, atol=1e-8)
    # Under-determined (N < D, dual): the minimum-norm solution in standardised units.
    x, y = rng.normal(size=(10, 30)), rng.normal(size=10)
    z = (x - x.mean(0)) / x.std(0)
    w = np.linalg.lstsq(z, y - y.mean(), rcond=None)[0]
    model = leakage.ridge_fit(x, y, 1e-10)
    assert model.solver == "dual" and model.coef.shape == (30, 1)
    np.testing.assert_allclose(model.coef[:, 0], w, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(leakage.ridge_predict(model, x), y, atol=1e-7)  # interpolates


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_primal_and_dual_agree(shape):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=shape), rng.normal(size=(shape[0], 3))
    x_new = rng.normal(size=(5, shape[1]))
    for lam in (1e-3, 0.7, 1e3):
        p = leakage.ridge_fit(x, y, lam, solver="primal")
        d = leakage.ridge_fit(x, y, lam, solver="dual")
        np.testing.assert_allclose(p.coef, d.coef, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(leakage.ridge_predict(p, x_new), leakage.ridge_predict(d, x_new),
                                   rtol=1e-8, atol=1e-10)
        # And both solve the penalised normal equations with an unpenalised intercept.
        z = (x - x.mean(0)) / x.std(0)
        want = np.linalg.solve(z.T @ z + lam * np.eye(shape[1]), z.T @ (y - y.mean(0)))
        np.testing.assert_allclose(p.coef, want, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(p.intercept, y.mean(0))


def test_standardisation_uses_fit_stats_and_drops_constant_columns():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(40, 4)) * 100 + 5, np.full((40, 1), 3.0)], 1)
    y = x[:, 0] * 0.01 + rng.normal(size=40) * 0.01
    model = leakage.ridge_fit(x, y, 1.0)
    np.testing.assert_allclose(model.mean[:4], x[:, :4].mean(0))
    assert model.inv_std[4] == 0 and model.coef[4, 0] == 0
    x_new = rng.normal(size=(6, 5))
    moved = x_new.copy()
    moved[:, 4] = 1e6  # the constant column's value at predict time is irrelevant
    pred = leakage.ridge_predict(model, x_new)
    assert pred.shape == (6,)
    np.testing.assert_array_equal(pred, leakage.ridge_predict(model, moved))
    # Scale invariance of the fit (standardised features): rescaled x, same predictions.
    scaled = leakage.ridge_fit(x * 1e3, y, 1.0)
    np.testing.assert_allclose(leakage.ridge_predict(scaled, x_new * 1e3), pred, rtol=1e-9)


def test_r2_matches_sklearn_definition():
    t = np.array([[1.0, 2.0, 5.0], [2.0, 2.0, 6.0], [3.0, 2.0, 7.0], [4.0, 2.0, 9.0]])
    p = np.array([[1.5, 2.0, 5.0], [2.0, 2.0, 6.5], [2.5, 2.0, 7.0], [4.0, 2.0, 8.0]])
    r2_0 = 1 - 0.5 / 5.0                 # 1 - SS_res / SS_tot
    r2_2 = 1 - 1.25 / 8.75
    # Output 1 is constant and predicted exactly: scores 1.
    assert leakage.r2_score(t, p) == pytest.approx((r2_0 + 1.0 + r2_2) / 3)
    p[0, 1] = 3.0  # constant truth, wrong prediction: scores 0
    assert leakage.r2_score(t, p) == pytest.approx((r2_0 + 0.0 + r2_2) / 3)
    assert leakage.r2_score(t[:, 0], t[:, 0]) == 1.0
    assert leakage.r2_score(t[:, 0], np.full(4, t[:, 0].mean())) == 0.0


def test_validation_split_is_deterministic_and_keeps_groups_whole():
    tr, va = leakage.validation_split(12)
    np.testing.assert_array_equal(va, [4, 9])
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(12))
    groups = np.repeat([7, 3, 9, 1, 5, 2, 8], 3)  # sorted distinct: 1 2 3 5 7 8 9 -> hold 1, 8
    tr, va = leakage.validation_split(groups.size, groups)
    assert set(groups[va]) == {1, 8} and not set(groups[va]) & set(groups[tr])
    assert tr.size + va.size == groups.size
    with pytest.raises(ValueError, match="2 distinct groups"):
        leakage.validation_split(4, np.zeros(4))


def test_penalty_choice_never_reads_the_test_set():
    """Replacing the test targets (and features) changes the scores, never the chosen penalties."""
    fit, test = _dataset(40, signal=0.3, seed=3)
    rng = np.random.default_rng(4)
    base = _probe(fit, test)
    other = dict(x=rng.normal(size=test["x"].shape), shape=rng.normal(size=test["shape"].shape),
                 ids=rng.permutation(test["ids"]), motion=test["motion"])
    out = _probe(fit, other)
    for key in ("lam_shape", "lam_id", "val_shape_r2", "val_id_accuracy"):
        assert out[key] == base[key], key
    assert out["shape_r2"] != base["shape_r2"]
    # The chosen penalty is the best on the fit set's validation split: a single-penalty grid
    # containing it reproduces the same validation score.
    single = _probe(fit, test, lams=(base["lam_shape"],))
    assert single["val_shape_r2"] == pytest.approx(base["val_shape_r2"])
    # Without groups the split is every 5th fit sample (still deterministic, still fit-only).
    a = leakage.probe(fit["x"], fit["shape"], fit["ids"], test["x"], test["shape"], test["ids"])
    b = leakage.probe(fit["x"], fit["shape"], fit["ids"], other["x"], other["shape"], other["ids"])
    assert (a["lam_shape"], a["lam_id"]) == (b["lam_shape"], b["lam_id"])


def test_unseen_test_identity_counts_as_error_and_shapes_checked():
    fit, test = _dataset(40, signal=1.0)
    ids = test["ids"].copy()
    ids[:12] = 99  # not an identity of the fit set
    out = leakage.probe(fit["x"], fit["shape"], fit["ids"], test["x"], test["shape"], ids,
                        groups_fit=fit["motion"])
    assert out["id_accuracy"] <= 1 - 12 / ids.size + 1e-12
    with pytest.raises(ValueError, match="samples"):
        leakage.probe(fit["x"], fit["shape"][:-1], fit["ids"], test["x"], test["shape"], ids)


def test_float32_rounding_residue_is_not_a_feature():
    """A collapsed token position holds one code for every frame, but the straight-through
    output z + sg(z_q - z) keeps float32 rounding that depends on z (hence on the identity).
    Standardised, that residue read as a perfect identity feature (accuracy 1.0); columns
    constant to within their own precision are now dropped, and the probe sits at chance."""
    fit, test = _dataset(dim=8, signal=0.0)
    ulps = np.random.default_rng(3).integers(-2, 3, (NUM_IDS, 8))  # per identity and column
    for d in (fit, test):
        d["x"] = np.float32(0.3) + (ulps[d["ids"]] * 3e-8).astype(np.float32)
        assert d["x"].dtype == np.float32 and len(np.unique(d["x"], axis=0)) == NUM_IDS
    out = _probe(fit, test)
    assert out["id_accuracy"] == pytest.approx(out["id_chance"]) and out["shape_r2"] <= 0.0
    assert out["id_accuracy"] < 0.5
    # the same spread in float64 inputs is (far) above their precision: a feature there
    x64 = {k: dict(d, x=d["x"].astype(np.float64)) for k, d in (("fit", fit), ("test", test))}
    assert _probe(x64["fit"], x64["test"])["id_accuracy"] == 1.0


def test_token_features_are_the_codes_exactly(tiny_config):
    """The stage-2 evaluation probes the codebook rows the indices name, not the straight-through
    output: equal codes give bit-equal features."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from im_anim_jax.evaluation import stage2 as stage2_eval
    from im_anim_jax.models.quantizer import code_vectors
    from im_anim_jax.models.stage1 import build_stage1
    model = build_stage1(tiny_config.model)
    size = tiny_config.model.motion_tokenizer.image_size
    frames = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 3, size, size, 3)),
                         jnp.uint8)
    params = nn.unbox(model.init(jax.random.key(0), frames)["params"])
    feats = np.asarray(stage2_eval._features(model, params, frames))
    z_st, aux = model.apply({"params": params}, frames, method=type(model).encode)
    codes = np.asarray(code_vectors(params["quantize"]["embedding"], aux["indices"]))
    np.testing.assert_array_equal(feats, codes)
    np.testing.assert_allclose(feats, np.asarray(z_st), atol=1e-6)   # the same codes, up to rounding
