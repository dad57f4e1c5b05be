"""Losses of ZSKT and of the KD+AT baseline, with the authors' exact scaling (docs/method.md,
section "Losses").

All functions take per-device arrays and return means over the local batch; the step averages
them across devices with ``pmean``.
"""
from typing import Sequence

import jax
import jax.numpy as jnp

from zskt_jax.errors import ConfigError


def kl_divergence(teacher_logits, student_logits, temperature: float = 1.0):
    """KL(T || S) averaged over batch * classes, as the released code does (no tau^2 factor).

    = mean_{b,c} t_bc (log t_bc - log s_bc): the per-sample KL divided by the number of classes.
    Both the generator (negated) and the student use exactly this quantity.
    """
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.mean(jnp.exp(log_t) * (log_t - log_s))


def attention_map(activation, eps: float = 1e-12):
    """[B, H, W, C] -> [B, H*W]: square, MEAN over channels, flatten, L2-normalise per sample.

    The paper writes a sum of squares; the code (which produced the numbers) uses the mean. The
    normalisation is torch's F.normalize: x / max(||x||_2, eps).
    """
    a = jnp.mean(jnp.square(activation.astype(jnp.float32)), axis=-1)
    a = a.reshape(a.shape[0], -1)
    norm = jnp.sqrt(jnp.sum(jnp.square(a), axis=-1, keepdims=True))
    return a / jnp.maximum(norm, eps)


def attention_transfer(student_activations: Sequence, teacher_activations: Sequence):
    """Sum over groups of mean_{B, H*W} (map_s - map_t)^2 (the code's form; the paper's text uses
    the norm of the difference). Groups must have equal spatial sizes."""
    total = 0.0
    for s, t in zip(student_activations, teacher_activations, strict=True):
        if s.shape[1:3] != t.shape[1:3]:
            raise ValueError(f'attention transfer needs equal spatial sizes; student group is '
                             f'{s.shape[1:3]}, teacher group is {t.shape[1:3]}')
        total = total + jnp.mean(jnp.square(attention_map(s) - attention_map(t)))
    return total


def paired_stages(teacher_activations: Sequence, student_activations: Sequence, pairs=None):
    """The stage outputs attention transfer compares, in pairs: ``pairs`` of (teacher index,
    student index) (``common.attention_pairs``), or None for every stage in order (the WRN pairs'
    three groups: the paper's attention transfer)."""
    if pairs is None:
        return teacher_activations, student_activations
    return ([teacher_activations[i] for i, _ in pairs],
            [student_activations[j] for _, j in pairs])


def generator_loss(teacher_logits, student_logits, discrepancy=kl_divergence):
    """The generator maximises KL(T || S): loss_G = -KL. No attention term (docs/method.md).
    ``discrepancy``: another D(T, S) in place of the KL (``adversarial_discrepancy``)."""
    return -discrepancy(teacher_logits, student_logits)


def student_loss(teacher_logits, student_logits, teacher_activations, student_activations,
                 beta: float, discrepancy=kl_divergence):
    """loss_S = KL(T || S) + beta * AT; returns (loss, kl, at). ``discrepancy``: as in
    ``generator_loss`` (then the second value is that discrepancy)."""
    kl = discrepancy(teacher_logits, student_logits)
    at = attention_transfer(student_activations, teacher_activations) if beta > 0 else jnp.zeros(())
    return kl + beta * at, kl, at


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy with integer labels."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))


def kd_at_loss(student_logits, teacher_logits, labels, student_activations, teacher_activations,
               alpha: float, temperature: float, beta: float):
    """Few-shot KD+AT baseline: (1 - alpha) CE + 2 alpha tau^2 KL_mean + beta AT (docs/method.md).

    KL_mean is the same batch*classes mean as above, at temperature tau; the factor 2 is the
    released code's. Returns (loss, ce, kl, at).
    """
    ce = cross_entropy(student_logits, labels)
    kl = kl_divergence(teacher_logits, student_logits, temperature)
    at = attention_transfer(student_activations, teacher_activations) if beta > 0 else jnp.zeros(())
    loss = (1 - alpha) * ce + 2 * alpha * temperature ** 2 * kl + beta * at
    return loss, ce, kl, at


# ---------------------------------------------------------------------------------------------
# Stabilisers of the later data-free methods (docs/method.md, section "Stabilisers"). None is part
# of ZSKT; each is a config field, off in the paper configs.

def mean_absolute_difference(teacher_logits, student_logits):
    """DFAD's discrepancy: mean over batch and classes of |logit_T - logit_S| (the L1 criterion,
    maximised by the generator and minimised by the student in place of the KL)."""
    return jnp.mean(jnp.abs(teacher_logits.astype(jnp.float32)
                            - student_logits.astype(jnp.float32)))


ADVERSARIAL_LOSSES = {'kl': kl_divergence, 'l1': mean_absolute_difference}


def adversarial_discrepancy(name: str):
    """config.adversarial_loss -> the discrepancy D(T, S) the generator maximises and the student
    minimises: 'kl' (ZSKT, ``kl_divergence``) or 'l1' (DFAD, ``mean_absolute_difference``)."""
    if name not in ADVERSARIAL_LOSSES:
        raise ConfigError(f'config.adversarial_loss = {name!r}; choose one of '
                         f'{sorted(ADVERSARIAL_LOSSES)}')
    return ADVERSARIAL_LOSSES[name]


def bn_statistics_loss(input_moments, running_statistics):
    """DeepInversion's BatchNorm-statistics term, summed over layers:
    sum_l ||running_var_l - var_l||_2 + ||running_mean_l - mean_l||_2 (norms, not squared).

    input_moments: {layer: (mean [C], biased var [C])} of each BatchNorm's input on the batch;
    running_statistics: {layer: (running_mean [C], running_var [C])}, the same layers.
    """
    if set(input_moments) != set(running_statistics):
        raise ValueError(f'BatchNorm layers differ: {sorted(input_moments)} vs '
                         f'{sorted(running_statistics)}')
    total = jnp.zeros((), jnp.float32)
    for layer in sorted(input_moments):
        mean, var = input_moments[layer]
        running_mean, running_var = running_statistics[layer]
        total = total + (jnp.linalg.norm(running_var - var) + jnp.linalg.norm(running_mean - mean))
    return total


def class_balance_loss(mean_probabilities):
    """DAFL's information-entropy term: sum_c p_c log p_c of the batch-mean teacher softmax p
    [C] (the negative entropy, natural log); minimising it makes every class keep being
    generated. ``p`` must be the mean over the WHOLE batch (all devices)."""
    p = mean_probabilities.astype(jnp.float32)
    return jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)))


def one_hot_loss(teacher_logits):
    """DAFL's / DFQ's one-hot term: the teacher's cross-entropy against its own argmax
    (confident teacher predictions on the generated images)."""
    return cross_entropy(teacher_logits, jnp.argmax(teacher_logits, axis=-1))
