import jax
import jax.numpy as jnp
import numpy as np
import pytest

from im_anim_jax.models.quantizer import VectorQuantizer, codebook_stats


def _setup(l2=True, k=16, c=4, n=(3, 5)):
    vq = VectorQuantizer(codebook_size=k, token_size=c, use_l2_norm=l2)
    z = jax.random.normal(jax.random.key(0), n + (c,))
    params = vq.init(jax.random.key(1), z)
    params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape),
                          jax.tree.map(lambda x: getattr(x, "value", x), params,
                                       is_leaf=lambda x: hasattr(x, "value")))
    return vq, params, z


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("l2", [True, False])
def test_nearest_code_and_losses_match_numpy(l2):
    vq, params, z = _setup(l2)
    zq, aux = vq.apply(params, z)
    e = np.asarray(params["params"]["embedding"])
    zn = np.asarray(z)
    if l2:
        zn, e = _normalize(zn), _normalize(e)
    d = ((zn[..., None, :] - e) ** 2).sum(-1)
    idx = d.argmin(-1)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), idx)
    np.testing.assert_allclose(np.asarray(zq), e[idx], atol=1e-6)
    mse = ((e[idx] - zn) ** 2).mean()
    assert float(aux["commitment_loss"]) == pytest.approx(0.25 * mse, rel=1e-5)
    assert float(aux["codebook_loss"]) == pytest.approx(mse, rel=1e-5)
    assert float(aux["loss"]) == pytest.approx(1.25 * mse, rel=1e-5)


def test_straight_through_gradient_is_identity():
    vq, params, z = _setup(l2=False)
    c = jax.random.normal(jax.random.key(3), z.shape)
    g = jax.grad(lambda z: jnp.sum(vq.apply(params, z)[0] * c))(z)
    np.testing.assert_allclose(np.asarray(g), np.asarray(c), atol=1e-6)


def test_straight_through_gradient_through_l2_normalisation():
    vq, params, z = _setup(l2=True)
    c = jax.random.normal(jax.random.key(3), z.shape)
    g = jax.grad(lambda z: jnp.sum(vq.apply(params, z)[0] * c))(z)
    g_ref = jax.grad(lambda z: jnp.sum(z / jnp.linalg.norm(z, axis=-1, keepdims=True) * c))(z)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5)


def test_codebook_learns_only_from_codebook_loss_and_encoder_only_from_commitment():
    vq, params, z = _setup(l2=False)
    commit = lambda p, z: vq.apply(p, z)[1]["commitment_loss"]
    book = lambda p, z: vq.apply(p, z)[1]["codebook_loss"]
    gp_commit, gz_commit = jax.grad(commit, argnums=(0, 1))(params, z)
    gp_book, gz_book = jax.grad(book, argnums=(0, 1))(params, z)
    assert float(jnp.abs(gp_commit["params"]["embedding"]).max()) == 0.0
    assert float(jnp.abs(gz_book).max()) == 0.0
    assert float(jnp.abs(gp_book["params"]["embedding"]).max()) > 0.0
    assert float(jnp.abs(gz_commit).max()) > 0.0


def test_codebook_stats():
    s = codebook_stats(jnp.array([0, 0, 1, 1]), 4)
    assert float(s["codebook_usage"]) == 0.5
    assert float(s["codebook_perplexity"]) == pytest.approx(2.0)
    s = codebook_stats(jnp.array([3, 3, 3]), 8)
    assert float(s["codebook_usage"]) == 1 / 8 and float(s["codebook_perplexity"]) == pytest.approx(1.0)


def test_wrong_token_size_is_a_clear_error():
    vq = VectorQuantizer(codebook_size=8, token_size=4)
    with pytest.raises(ValueError, match="token size 4"):
        vq.init(jax.random.key(0), jnp.zeros((2, 5)))


def test_dead_code_restart_replaces_only_unused_codes_with_encoder_outputs():
    from im_anim_jax.models.quantizer import restart_dead_codes
    book = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
    usage = jnp.array([1.0, 1.0, 0.05, 0.05, 1.0, 0.05, 1.0, 1.0])
    indices = jnp.array([0, 0, 3, 4])  # code 3 is used in this batch: its EMA recovers
    z = jnp.full((4, 3), -1.0) - jnp.arange(4.0)[:, None]
    new_book, new_usage, n = restart_dead_codes(book, usage, indices, z, jax.random.key(0),
                                                decay=0.5, threshold=0.1)
    # EMA: 0.5 * usage + 0.5 * counts -> codes 2 and 5 fall to 0.025 < 0.1; code 3 gets 0.525.
    assert int(n) == 2
    dead = np.array([2, 5])
    alive = np.setdiff1d(np.arange(8), dead)
    np.testing.assert_array_equal(np.asarray(new_book)[alive], np.asarray(book)[alive])
    for k in dead:  # each restarted code is one of this batch's encoder outputs
        assert any(np.allclose(new_book[k], z[i]) for i in range(4))
    np.testing.assert_allclose(np.asarray(new_usage)[dead], 1.0)
    np.testing.assert_allclose(float(new_usage[3]), 0.525, rtol=1e-6)
    np.testing.assert_allclose(float(new_usage[0]), 0.5 + 0.5 * 2)


def test_dead_code_restart_gives_each_code_its_own_encoder_output():
    """Drawn with replacement, several codes landed on one output (512 outputs and 4095 dead
    codes: at most 512 distinct rows, 172 of 200 for 200 dead); tied rows never win argmin, so
    the copies stayed dead. Now each restarted code gets a different output, and codes beyond
    the batch's outputs restart at the next steps."""
    from im_anim_jax.models.quantizer import restart_dead_codes
    k, n, c = 64, 8, 4
    z = jax.random.normal(jax.random.key(1), (n, c))
    book, usage = jnp.zeros((k, c)), jnp.zeros((k,))
    indices = jnp.zeros((n,), jnp.int32)  # everything on code 0: the rest are dead
    for step in range(8):
        book, usage, restarted = restart_dead_codes(book, usage, indices, z,
                                                    jax.random.key(step), decay=0.9,
                                                    threshold=0.03)
        fresh = np.arange(1 + n * step, min(k, 1 + n * (step + 1)))
        assert int(restarted) == len(fresh)
        rows = {tuple(np.asarray(book[i])) for i in fresh}
        assert len(rows) == len(fresh)  # distinct
        assert rows <= {tuple(np.asarray(r)) for r in z}
        np.testing.assert_array_equal(np.asarray(usage)[fresh], 1.0)
    assert int(restart_dead_codes(book, usage, indices, z, jax.random.key(9), decay=0.9,
                                  threshold=0.03)[2]) == 0  # all 63 restarted within 8 steps
