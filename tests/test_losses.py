"""Loss values against NumPy computations written here from docs/method.md, section "Losses"."""
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


# ---------------------------------------------------------------------------------------------
# The later methods' stabilisers (docs/method.md, section "Stabilisers"), against NumPy.

def test_mean_absolute_difference_is_dfad_l1():
    rng = np.random.default_rng(3)
    t, s = rng.normal(size=(6, 10)) * 2, rng.normal(size=(6, 10)) * 2
    expected = np.mean(np.abs(t - s))
    np.testing.assert_allclose(losses.mean_absolute_difference(jnp.array(t), jnp.array(s)),
                               expected, rtol=1e-6)
    l1 = losses.adversarial_discrepancy('l1')
    np.testing.assert_allclose(losses.generator_loss(jnp.array(t), jnp.array(s), l1), -expected,
                               rtol=1e-6)
    loss, value, at = losses.student_loss(jnp.array(t), jnp.array(s), (), (), 0.0, l1)
    np.testing.assert_allclose([loss, value], [expected, expected], rtol=1e-6)
    assert losses.adversarial_discrepancy('kl') is losses.kl_divergence


def test_unknown_adversarial_loss_is_named():
    import pytest
    with pytest.raises(ValueError, match=r"adversarial_loss = 'l2'; choose one of \['kl', 'l1'\]"):
        losses.adversarial_discrepancy('l2')


def test_class_balance_is_the_negative_entropy_of_the_batch_mean_softmax():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(8, 10)) * 3
    p = np_softmax(logits).mean(0)
    expected = np.sum(p * np.log(p))  # natural log; -log(10) at a uniform batch mean
    np.testing.assert_allclose(losses.class_balance_loss(jnp.array(p)), expected, rtol=1e-6)
    uniform = jnp.full((10,), 0.1)
    np.testing.assert_allclose(losses.class_balance_loss(uniform), -np.log(10), rtol=1e-6)
    # One class only: entropy 0, the largest value (the generator minimises this term); a class
    # with p = 0 contributes 0 (p log p -> 0), not NaN.
    assert float(losses.class_balance_loss(jnp.eye(10)[3])) == 0.0


def test_one_hot_is_the_teacher_cross_entropy_against_its_own_argmax():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(7, 10)) * 2
    log_p = np.log(np_softmax(logits))
    expected = -np.mean(log_p[np.arange(7), logits.argmax(-1)])
    np.testing.assert_allclose(losses.one_hot_loss(jnp.array(logits)), expected, rtol=1e-6)


def test_bn_statistics_loss_sums_unsquared_norms_over_layers():
    rng = np.random.default_rng(6)
    layers = {('a', 'bn1'): 4, ('b', 'bn2'): 6}
    moments, running, expected = {}, {}, 0.0
    for layer, channels in layers.items():
        mean, var, rm, rv = (rng.normal(size=channels) for _ in range(4))
        moments[layer], running[layer] = (jnp.array(mean), jnp.array(var)), (jnp.array(rm), jnp.array(rv))
        expected += np.sqrt(np.sum((rv - var) ** 2)) + np.sqrt(np.sum((rm - mean) ** 2))
    np.testing.assert_allclose(losses.bn_statistics_loss(moments, running), expected, rtol=1e-6)
