"""The paper's hyperparameters (docs/method.md). Dataset configs start here and change what
differs."""
import ml_collections

from configs import runtime


def get_config():
    config = ml_collections.ConfigDict()
    config.job = 'zero_shot'          # zero_shot | teacher | few_shot | belief
    config.seed = 0                   # parameter init and z stream
    config.dataset = 'svhn'           # evaluation data (digits | svhn | cifar10 | cifar100)
    config.data_dir = ''              # TFDS data dir; '' = TFDS's default (~/tensorflow_datasets)

    config.teacher = ml_collections.ConfigDict()
    config.teacher.arch = 'WRN-40-2'  # a name of zskt_jax.models.registry: WRN-depth-width, resnet34, vgg11, ...
    config.teacher.base_width = 16    # channels of the stem (the paper's WRNs: 16); 0 = the architecture's own
    config.teacher.checkpoint = ''    # teacher directory; '' = runs/teacher_{dataset}_{arch}/teacher
    config.teacher.recipe = ''        # a teacher config file run first when the teacher is missing

    config.student = ml_collections.ConfigDict()
    config.student.arch = 'WRN-16-1'
    config.student.base_width = 16

    config.generator = ml_collections.ConfigDict()
    config.generator.z_dim = 100      # z ~ N(0, I)
    config.generator.hidden = 128     # channels after the Dense layer (64 after the second conv)

    config.num_iterations = 50_000    # N (SVHN 50k, CIFAR-10 80k)
    config.batch_size = 128           # global batch, split over all devices
    config.n_g = 1                    # generator updates per iteration
    config.n_s = 10                   # student updates per iteration, same z
    config.generator_lr = 1e-3        # released scripts (the paper's text says 2e-3)
    config.student_lr = 2e-3
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.grad_clip = 5.0            # global L2 norm, both networks
    config.beta = 250.0               # attention-transfer weight (student loss only)

    # A later method by name (docs/methods.md): zskt | dfad | dafl | dfq | robust sets the fields
    # below when the run starts (a field given on the command line wins); '' = these fields as set.
    config.method = ''
    # Stabilisers of the data-free methods after ZSKT (docs/method.md, section "Stabilisers"). All
    # off here and in every paper config: the paper's iteration, bit for bit (nothing is traced).
    config.adversarial_loss = 'kl'    # D(T, S) of both players: 'kl' (ZSKT) | 'l1' (DFAD's mean |logit diff|)
    config.bn_weight = 0.0            # DeepInversion/DFQ/CMI: ||running - batch|| of every teacher BN input, on G
    config.balance_weight = 0.0       # DAFL: sum_c p_c log p_c of the batch-mean teacher softmax, on G
    config.one_hot_weight = 0.0       # DAFL/DFQ: teacher cross-entropy against its own argmax, on G
    config.replay_size = 0            # CMI's image pool: past generated images kept (a multiple of batch_size)
    config.replay_batch = 0           # images replayed from it into every student batch
    config.student_augment = 'none'   # 'crop': each student image shifted by up to H/8 pixels (CMI)

    runtime.add(config, unit='iterations', log_every=50, eval_every=500,  # eval: N / 100
                checkpoint_every=1000, keep_checkpoints=3)
    config.num_seeds = 1              # >1: that many generator/student pairs (seeds seed..seed+k-1) in one program
    config.update_loop = 'auto'       # n_g/n_s updates as: scan | unroll | auto (unroll on CPU)
    return config
