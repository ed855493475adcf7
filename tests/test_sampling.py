"""Flow-matching sampler: sigma schedule, CFG, Euler / UniPC convergence on an exact field."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from im_anim_jax import text
from im_anim_jax.sampling import (cfg, guided, sample, schedule, shift_timesteps, shifted_sigmas,
                                 unipc_sigmas)


def test_shifted_sigmas():
    for shift in (0.1, 1.0, 3.0, 5.0, 12.0):
        sig = shifted_sigmas(7, shift)
        assert sig.dtype == np.float64 and sig.shape == (8,)
        assert sig[0] == 1.0 and sig[-1] == 0.0
        assert np.all(np.diff(sig) < 0)
    np.testing.assert_allclose(shifted_sigmas(5, 1.0), np.linspace(1, 0, 6), rtol=0, atol=1e-15)
    # by hand: s = .75, .5, .25 -> 3s / (1 + 2s) = .9, .75, .5
    np.testing.assert_allclose(shifted_sigmas(4, 3.0), [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-15)
    u = jnp.array([0.0, 0.25, 1.0])
    np.testing.assert_allclose(np.asarray(shift_timesteps(u, 3.0)), [0.0, 0.5, 1.0], atol=1e-6)


def _gaussian_problem(dim: int, seed: int = 0):
    """x0 ~ N(mu, s0^2) per coordinate. With x_s = (1-s) x0 + s eps: mean (1-s) mu,
    var V = (1-s)^2 s0^2 + s^2, Cov(eps - x0, x_s) = s - (1-s) s0^2, so the exact velocity is
    v = -mu + (s - (1-s) s0^2) / V * (x - (1-s) mu), and the flow sends z (s=1) to mu + s0 z."""
    rng = np.random.default_rng(seed)
    mu, z = jnp.asarray(rng.normal(size=dim)), jnp.asarray(rng.normal(size=dim))
    s0 = jnp.asarray(rng.uniform(0.1, 2.0, size=dim))

    def velocity(x, s):
        var = (1 - s) ** 2 * s0 ** 2 + s ** 2
        return -mu + (s - (1 - s) * s0 ** 2) / var * (x - (1 - s) * mu)
    return velocity, z, mu + s0 * z


def _error(method: str, steps: int, shift: float = 1.0) -> float:
    velocity, z, target = _gaussian_problem(64)
    x = sample(jax.jit(velocity), z, shifted_sigmas(steps, shift), method=method)
    assert x.dtype == jnp.float64
    return float(jnp.max(jnp.abs(x - target)))


def test_convergence_orders():
    with jax.enable_x64(True):
        euler = {n: _error("euler", n) for n in (8, 16, 20)}
        unipc = {n: _error("unipc", n) for n in (8, 16, 20, 32)}
        unipc_shift5 = _error("unipc", 20, 5.0)
        euler_shift5 = _error("euler", 20, 5.0)
    # measured (max abs error over 64 coords, float64, shift 1): euler 8/16/20 = 0.591 / 0.307 /
    # 0.248 (ratio 1.93: order 1); unipc 8/16/20/32 = 8.43e-2 / 1.68e-2 / 1.00e-2 / 2.86e-3 (ratios
    # 5.03, 5.86: order >= 2). Shift 5, 20 steps: euler 0.323, unipc 0.160 (the large first-order
    # last step onto s = 0 dominates). Broken variants fail the ratio bound: no corrector 3.51 /
    # 3.26, no predictor history 4.18 / 2.93, first corrector rho 1 4.10 / 4.35, wrong sign 1.38.
    assert 1.5 < euler[8] / euler[16] < 2.6
    assert euler[16] > euler[20]
    assert unipc[8] / unipc[16] > 4.5 and unipc[16] / unipc[32] > 4.5
    assert unipc[20] < 0.015 and unipc[32] < 4e-3
    assert unipc[20] < euler[20] / 15
    assert unipc_shift5 < euler_shift5 / 1.5


def test_x0_predictions_sample_as_trained():
    """An x0-predicting DiT trained under x0_velocity's floor outputs x - max(s, MIN_SIGMA) v at
    its optimum (v the exact velocity), not x0. Sampled through x0_velocity, it reaches the
    exact flow's endpoint as the exact velocity does; divided by the unfloored sigma (the
    sampler before) it misses by far more where the schedule goes under the floor."""
    from im_anim_jax.models.stage3 import MIN_SIGMA, x0_velocity
    with jax.enable_x64(True):
        velocity, z, target = _gaussian_problem(64)

        def trained(x, s):
            return x - max(s, MIN_SIGMA) * velocity(x, s)

        def error(f, steps, shift):
            sigmas, _ = schedule("unipc", steps, shift)
            assert 0 < sigmas[-2] < MIN_SIGMA  # the last step goes under the floor
            return float(jnp.max(jnp.abs(sample(f, z, sigmas, method="unipc") - target)))
        # measured (max abs error, float64): 100 steps at shift 5 (last sigma 0.048): exact
        # 8.94e-3, floored the same, unfloored 1.16e-2; 50 steps at shift 1 (0.020): 5.15e-3,
        # the same, 0.143
        for steps, shift, factor in ((100, 5.0, 1.2), (50, 1.0, 20.0)):
            exact = error(velocity, steps, shift)
            floored = error(lambda x, s: x0_velocity(x, trained(x, s), s), steps, shift)
            unfloored = error(lambda x, s: (x - trained(x, s)) / s, steps, shift)
            assert abs(floored - exact) < 1e-9
            assert unfloored > factor * exact


def test_unipc_matches_reference_scheduler():
    # golden values from a line-by-line float64 transcription of Wan2.2's
    # FlowUniPCMultistepScheduler (order 2, bh2, predict_x0, lower_order_final), sigma_0 < 1
    mu, s0 = np.array([0.5, -1.0, 2.0]), np.array([0.3, 1.0, 1.7])

    def velocity(x, s):
        var = (1 - s) ** 2 * s0 ** 2 + s ** 2
        return -mu + (s - (1 - s) * s0 ** 2) / var * (x - (1 - s) * mu)
    sigmas = np.concatenate([[0.999], shifted_sigmas(6, 5.0)[1:]])
    with jax.enable_x64(True):
        x = sample(velocity, jnp.array([1.0, -0.5, 0.25]), sigmas, method="unipc")
        np.testing.assert_allclose(np.asarray(x), [0.5855611955441784, -1.341392166782358,
                                                   2.3560334937107075], rtol=1e-12)
        # sigma_0 = 1 (lambda = -inf) is the limit of sigma_0 -> 1 (here the difference ~3e-5)
        velocity, z, _ = _gaussian_problem(16)
        sigmas = shifted_sigmas(12, 5.0)
        at_one = sample(velocity, z, sigmas, method="unipc")
        sigmas[0] = 1 - 1e-12
        near_one = sample(velocity, z, sigmas, method="unipc")
        assert float(jnp.max(jnp.abs(at_one - near_one))) < 1e-4


def test_schedules_are_wan22s():
    # Wan2.2's FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1,
    # use_dynamic_shifting=False).set_timesteps(6, shift=5.0), run on its own code: .sigmas
    # (float32) and .timesteps (int64, what the DiT gets)
    sigmas, timesteps = unipc_sigmas(6, 5.0)
    np.testing.assert_array_equal(sigmas, np.float32(
        [0.9997998476028442, 0.9613164067268372, 0.9088428020477295, 0.8330553770065308,
         0.7139794230461121, 0.4996998906135559, 0.0]))
    wan_t = [999, 961, 908, 833, 713, 499]
    assert timesteps.dtype == np.int64 and timesteps.tolist() == wan_t
    assert [a.tolist() for a in schedule("unipc", 6, 5.0)] == [sigmas.tolist(), wan_t]
    # Euler: get_sampling_sigmas (Wan2.2's dpm++ path) ending at 0; t = 1000 sigma rounded down
    sigmas, timesteps = schedule("euler", 4, 3.0)
    np.testing.assert_array_equal(sigmas, shifted_sigmas(4, 3.0))
    assert timesteps.tolist() == [1000, 900, 750, 500]
    with pytest.raises(ValueError, match="unknown method"):
        schedule("heun", 4, 3.0)


def test_negative_context_for_guidance(tmp_path):
    import ml_collections
    config = ml_collections.ConfigDict(dict(
        model=dict(dit=dict(text_len=6, text_dim=4)),
        text=dict(embedding="", negative_embedding="", fixed_length=3, fixed_seed=0)))
    assert text.negative_context(config).shape == (6, 4) and not text.negative_context(config).any()
    e = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(tmp_path / "neg.npy", e)
    config.text.negative_embedding = str(tmp_path / "neg.npy")
    np.testing.assert_array_equal(text.negative_context(config), np.pad(e, ((0, 4), (0, 0))))
    np.save(tmp_path / "bad.npy", np.zeros((2, 5), np.float32))
    config.text.negative_embedding = str(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match=r"text.negative_embedding=.*bad.npy has shape \(2, 5\)"):
        text.negative_context(config)


@pytest.mark.parametrize("method", ["euler", "unipc"])
def test_clamp_and_evaluation_count(method):
    seen = []

    def velocity(x, s):
        seen.append((float(x[0, 0]), s))
        return x * 0.5 + 1.0

    def clamp(x):
        return x.at[0, 0].set(3.0)
    noise = jax.random.normal(jax.random.PRNGKey(0), (2, 5), jnp.float32)
    sigmas = shifted_sigmas(7, 3.0)
    x = sample(velocity, noise, sigmas, method=method, clamp=clamp, progress=True, desc="test")
    assert len(seen) == 7
    assert all(x0 == 3.0 for x0, _ in seen)
    assert [s for _, s in seen] == [float(s) for s in sigmas[:-1]]
    assert all(isinstance(s, float) for _, s in seen)
    assert x.dtype == jnp.float32 and x.shape == (2, 5) and float(x[0, 0]) == 3.0
    assert bool(jnp.all(jnp.isfinite(x)))


def test_cfg_and_guided():
    vc, vu = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
    np.testing.assert_allclose(np.asarray(cfg(vc, vu, 4.0)), [2.5, 11.0])
    np.testing.assert_allclose(np.asarray(cfg(vc, vu, 1.0)), np.asarray(vc))
    calls = []

    def velocity(x, s, cond):
        calls.append(cond)
        return x * s + (1.0 if cond else -1.0)
    x = jnp.ones(2)
    np.testing.assert_allclose(np.asarray(guided(velocity, 1.0)(x, 0.5)), [1.5, 1.5])
    assert calls == [True]
    calls.clear()
    # v_cond = 1.5, v_uncond = -0.5 -> -0.5 + 3 * 2 = 5.5
    np.testing.assert_allclose(np.asarray(guided(velocity, 3.0)(x, 0.5)), [5.5, 5.5])
    assert sorted(calls) == [False, True]


def test_bad_inputs():
    def velocity(x, s):
        return x
    noise = jnp.zeros(3)
    with pytest.raises(ValueError, match="num_steps"):
        shifted_sigmas(0, 1.0)
    with pytest.raises(ValueError, match="shift"):
        shifted_sigmas(4, 0.0)
    with pytest.raises(ValueError, match="shift"):
        shift_timesteps(0.5, -1.0)
    with pytest.raises(ValueError, match="euler.*unipc"):
        sample(velocity, noise, shifted_sigmas(4, 1.0), method="heun")
    with pytest.raises(ValueError, match="1-D"):
        sample(velocity, noise, np.ones((2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        sample(velocity, noise, [0.0])
    with pytest.raises(ValueError, match="decreasing"):
        sample(velocity, noise, [0.5, 0.7, 0.0])
    with pytest.raises(ValueError, match="decreasing"):
        sample(velocity, noise, [1.5, 0.7, 0.0])
    with pytest.raises(ValueError, match="end at exactly 0"):
        sample(velocity, noise, [1.0, 0.5, 0.1])
