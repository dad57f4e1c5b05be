"""Loss values against NumPy computations written here from REFERENCE.md."""
import numpy as np
import jax.numpy as jnp

from zskt_jax import losses


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kl_is_averaged_over_batch_times_classes():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(5, 10)) * 3, rng.normal(size=(5, 10)) * 3
    pt, ps = np_softmax(t), np_softmax(s)
    expected = np.sum(pt * (np.log(pt) - np.log(ps))) / (5 * 10)
    np.testing.assert_allclose(losses.kl_divergence(jnp.array(t), jnp.array(s)), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.generator_loss(jnp.array(t), jnp.array(s)), -expected, rtol=1e-5)
    assert float(losses.kl_divergence(jnp.array(t), jnp.array(t))) == 0.0


def test_kl_temperature():
    rng = np.random.default_rng(1)
    t, s = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    pt, ps = np_softmax(t / 4), np_softmax(s / 4)
    expected = np.mean(pt * (np.log(pt) - np.log(ps)))
    np.testing.assert_allclose(losses.kl_divergence(jnp.array(t), jnp.array(s), 4.0), expected,
                               rtol=1e-5)


def np_attention(a):
    m = (a ** 2).mean(-1).reshape(a.shape[0], -1)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def test_attention_map_and_transfer():
    rng = np.random.default_rng(2)
    shapes_s = [(4, 8, 8, 3), (4, 4, 4, 6), (4, 2, 2, 12)]
    shapes_t = [(4, 8, 8, 5), (4, 4, 4, 10), (4, 2, 2, 20)]  # channels may differ, sizes may not
    acts_s = [rng.normal(size=s) for s in shapes_s]
    acts_t = [rng.normal(size=s) for s in shapes_t]
    np.testing.assert_allclose(losses.attention_map(jnp.array(acts_s[0])), np_attention(acts_s[0]),
                               rtol=1e-5)
    expected = sum(np.mean((np_attention(a) - np_attention(b)) ** 2) for a, b in zip(acts_s, acts_t))
    got = losses.attention_transfer([jnp.array(a) for a in acts_s], [jnp.array(a) for a in acts_t])
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_attention_map_of_zeros_is_finite():
    assert np.all(np.asarray(losses.attention_map(jnp.zeros((2, 4, 4, 3)))) == 0)


def test_student_loss_combines_kl_and_beta_attention():
    rng = np.random.default_rng(3)
    t, s = jnp.array(rng.normal(size=(4, 10))), jnp.array(rng.normal(size=(4, 10)))
    acts_s = [jnp.array(rng.normal(size=(4, 4, 4, 2)))]
    acts_t = [jnp.array(rng.normal(size=(4, 4, 4, 3)))]
    loss, kl, at = losses.student_loss(t, s, acts_t, acts_s, beta=250.0)
    np.testing.assert_allclose(kl, losses.kl_divergence(t, s), rtol=1e-6)
    np.testing.assert_allclose(at, losses.attention_transfer(acts_s, acts_t), rtol=1e-6)
    np.testing.assert_allclose(loss, kl + 250.0 * at, rtol=1e-6)


def test_kd_at_loss():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(6, 10)), rng.normal(size=(6, 10))
    labels = rng.integers(0, 10, size=6)
    acts_s, acts_t = [rng.normal(size=(6, 4, 4, 2))], [rng.normal(size=(6, 4, 4, 5))]
    ce = -np.mean(np.log(np_softmax(s))[np.arange(6), labels])
    pt, ps = np_softmax(t / 4), np_softmax(s / 4)
    kl = np.mean(pt * (np.log(pt) - np.log(ps)))
    at = np.mean((np_attention(acts_s[0]) - np_attention(acts_t[0])) ** 2)
    expected = 0.1 * ce + 2 * 0.9 * 16 * kl + 1000 * at
    loss, *_ = losses.kd_at_loss(jnp.array(s), jnp.array(t), jnp.array(labels),
                                 [jnp.array(a) for a in acts_s], [jnp.array(a) for a in acts_t],
                                 alpha=0.9, temperature=4.0, beta=1000.0)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
