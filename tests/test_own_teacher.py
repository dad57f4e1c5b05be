"""A teacher of the user's own (docs/own_teacher.md): a Flax module that is not in the registry,
registered by name, saved with ``common.write_teacher`` and distilled by the zero-shot job."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from tiny_config import tiny_zero_shot_config
from zskt_jax import common, zero_shot
from zskt_jax.errors import ConfigError
from zskt_jax.models import registry


class SmallCNN(nn.Module):
    """A user's network: two strided convolutions and a linear head, no BatchNorm, no `train`
    argument; it returns the logits and, where ``features``, its two feature maps."""
    num_classes: int
    features: bool = False

    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))        # [B, 16, 16, 8]
        b = nn.relu(nn.Conv(16, (3, 3), strides=2)(a))       # [B, 8, 8, 16]
        logits = nn.Dense(self.num_classes)(jnp.mean(b, axis=(1, 2))) * 20
        return (logits, (a, b)) if self.features else logits


def small_cnn_stages(image_size):
    return (('conv1', image_size // 2, 8), ('conv2', image_size // 4, 16))


@pytest.fixture
def own_teacher(tmp_path):
    """'small_cnn' (logits only) and 'small_cnn_features' registered, the first one's variables
    saved as a digits teacher."""
    registry.register('small_cnn', lambda num_classes, **_: SmallCNN(num_classes))
    registry.register('small_cnn_features', lambda num_classes, **_: SmallCNN(num_classes, True),
                      stages=small_cnn_stages)
    try:
        variables = SmallCNN(10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        yield common.write_teacher(str(tmp_path / 'teacher'), variables, 'small_cnn', 'digits')
    finally:
        registry.unregister('small_cnn')
        registry.unregister('small_cnn_features')


def test_a_flax_module_of_ones_own_is_distilled(own_teacher, tmp_path, digits_data_dir):
    """A few iterations into a WRN student: the loss is finite and results.json names it."""
    config = tiny_zero_shot_config(digits_data_dir, own_teacher, **{'teacher.arch': 'small_cnn',
                                   'teacher.base_width': 0}, beta=0.0, one_hot_weight=0.1,
                                   balance_weight=1.0)
    results = zero_shot.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['iterations'] == 3 and 0 <= results['student_accuracy'] <= 1
    assert all(jnp.isfinite(v) for v in results['final_train_metrics'].values())
    saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert saved['config']['teacher']['arch'] == 'small_cnn'


def test_what_a_module_without_stages_or_batchnorm_cannot_do(own_teacher, digits_data_dir):
    """Attention transfer needs declared stages; BN-statistics matching needs the project's
    BatchNorm in the teacher: each is a clear config error, not a silent zero."""
    config = tiny_zero_shot_config(digits_data_dir, own_teacher, **{'teacher.arch': 'small_cnn',
                                   'teacher.base_width': 0})
    with pytest.raises(ConfigError, match='attention transfer needs teacher and student stages'):
        common.attention_pairs(config)
    config.beta, config.bn_weight = 0.0, 0.5
    with pytest.raises(ConfigError, match='BatchNorm-statistics term needs a teacher'):
        common.resolve_distillation(config)


def test_stages_a_module_declares_pair_with_the_student(own_teacher, digits_data_dir):
    config = tiny_zero_shot_config(digits_data_dir, own_teacher, **{
        'teacher.arch': 'small_cnn_features', 'teacher.base_width': 0})
    # WRN-10-1 groups at 32/16/8: the module's 16x16 and 8x8 maps pair with groups 2 and 3.
    assert common.attention_pairs(config) == ((0, 1), (1, 2))
    model = common.build_network(config.teacher, 10, config)
    variables = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
    logits, stages = model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False)
    assert logits.shape == (2, 10) and [s.shape[1:] for s in stages] == [(16, 16, 8), (8, 8, 16)]
