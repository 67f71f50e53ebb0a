"""Every key a training config has, with its default. Recipes in ``configs/`` start from here.

``python -m train --config configs/NAME.py --config.KEY=VALUE`` overrides any key below
(``apply_overrides``); a key that is not listed here is rejected, naming the closest known keys.
``model_overrides`` is open: ``--config.model_overrides.r=2`` adds a create_model keyword the
recipe did not set.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import pathlib

import ml_collections
from ml_collections import config_dict

from aff_jax.training.errors import ConfigError

OPEN_KEYS = ('model_overrides',)  # sub-dicts that take new keys from the command line
OVERRIDE_PREFIX = '--config.'


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Model: a name from aff_jax.list_models(); fusion None keeps the preset's scheme.
    c.model = 'cifar_aff_resnet32'
    c.fusion = config_dict.placeholder(str)
    # Extra create_model keywords: layers, channels, r, zero_init_last_bn, param_dtype, ...
    c.model_overrides = ml_collections.ConfigDict()
    # None: the dataset's number of classes. A larger head is allowed (the official CIFAR
    # script trains a 100-way head on the 20 CIFAR-100 superclasses).
    c.num_classes = config_dict.placeholder(int)
    c.dtype = 'float32'  # compute dtype ('bfloat16' on TPU/GPU); parameters stay float32
    # 'xla': XLA's own convolutions, on CPUs with the weight gradient's input stored once;
    # 'gemm': GEMM weight gradients on CPU and 1x1 convs as dots (aff_jax.conv). On a 2-core
    # AVX-512 Intel machine 'xla' trained cifar_aff_resnet32 1.7-1.8x, tv_resnet50 1.4x faster
    # (aff_resnet50 at 64x64: 0.96x; BENCHMARKS.md). Same values to 1e-5, other rounding.
    c.conv_implementation = 'xla'
    # Precision of float32 convolutions and matmuls (jax.default_matmul_precision): None is the
    # backend's default, on recent NVIDIA GPUs TF32 (10-bit mantissas); 'highest': full float32.
    c.matmul_precision = config_dict.placeholder(str)
    # Fine-tuning: an Orbax checkpoint of {'params', 'batch_stats'} written by
    # `python -m aff_jax.interop.convert`; its variables replace the fresh initialisation of a
    # new run (a resumed run ignores it). init_skip: path prefixes kept fresh, e.g. ('fc',).
    c.init_from = config_dict.placeholder(str)
    c.init_skip = ()

    # Data: a TFDS name, the embedded 'aff_multiscale', or 'imagefolder:PATH'.
    c.dataset = 'aff_multiscale'
    c.data_dir = config_dict.placeholder(str)
    c.image_size = config_dict.placeholder(int)  # None: the dataset's own size
    c.data_workers = 0  # grain worker processes per host
    # Training augmentation: 'default' (the dataset's own: pad-crop-flip for small images, the
    # Inception crop for larger ones, scale-crop-flip for segmentation), 'none', or that default
    # followed by 'autoaugment_cifar10', 'autoaugment_imagenet' or 'randaugment' (which applies
    # randaugment_num_ops ops at level randaugment_magnitude of 31; aff_jax.data.auto_augment).
    c.augment = 'default'
    c.randaugment_num_ops = 2
    c.randaugment_magnitude = 9
    # Folder datasets are checked file by file before step 1; True trains without the files
    # that fail (each is logged) instead of stopping with the list.
    c.skip_bad_files = False

    # Batch sizes are global (all processes together) and split over the mesh 'data' axis.
    c.batch_size = 128
    c.eval_batch_size = 256
    # Test-time augmentation: evaluate on each image and its mirror image, averaging logits.
    c.eval_flip = False
    c.num_train_steps = 1000

    # Optimizer: SGD with (Nesterov) momentum and coupled L2 weight decay, as Gluon's 'nag'.
    c.learning_rate = 0.1
    c.lr_base_batch_size = config_dict.placeholder(int)  # set: lr * batch_size / this
    # 'cosine' | 'linear' | 'step' | 'constant', each after a linear warmup
    c.schedule = 'cosine'
    c.warmup_steps = 0
    c.lr_decay_boundaries = ()  # 'step': absolute steps where lr *= lr_decay_factor
    c.lr_decay_factor = 0.1
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4
    c.weight_decay_bn_bias = False  # False: no decay on BatchNorm scale/bias and biases

    # Regularisation, both computed inside the train step.
    c.label_smoothing = 0.0
    c.mixup_alpha = 0.0  # 0 disables mixup
    c.mixup_off_steps = 0  # the last steps train without mixup

    c.seed = 0  # any int >= 0
    # PRNG for initialisation and mixup. 'rbg' (XLA's RngBitGenerator) compiles the model's
    # initialisation several times faster than 'threefry2x32' on CPU and is faster on TPU;
    # both give the same values on every mesh.
    c.rng_impl = 'rbg'
    # (data, model) device mesh; -1 takes all remaining devices.
    c.mesh_shape = (-1, 1)
    # (logical axis name, mesh axis) pairs; unlisted names are replicated. E.g.
    # (('conv_out', 'model'), ('classes', 'model')) shards conv outputs and the classifier.
    c.logical_axis_rules = ()

    # A step whose loss or gradients are not finite stops the run (exit status 3, nothing
    # non-finite checkpointed); True skips such updates instead and logs their count.
    c.skip_nonfinite_updates = False
    # Multi-process jobs: how long a process waits for the others to join before it names the
    # missing ones and exits.
    c.distributed_timeout_s = 120

    # Persistent XLA compilation cache: 'auto' ($XDG_CACHE_HOME/aff_jax/xla, or the directory
    # JAX_COMPILATION_CACHE_DIR names), a path, or 'off' ('') to compile afresh every run.
    c.compilation_cache = 'auto'
    # glibc's malloc keeps freed memory mapped and the CPU client runs steps on the calling
    # thread (aff_jax.host_memory): XLA:CPU re-allocates a step's temporaries every step, and
    # unmapped they fault back in page by page. 'auto': on when JAX can only use the CPU;
    # 'on' / 'off' force it. Process-wide, set before JAX starts.
    c.retain_freed_memory = 'auto'

    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.eval_every_steps = 1000
    c.log_every_steps = 50
    return c


def load_config(path: str | pathlib.Path, *args: str) -> ml_collections.ConfigDict:
    """``get_config(*args)`` of the config file ``path``: lets a recipe start from another.

    From a config file: ``load_config(pathlib.Path(__file__).with_name('other.py'))``.
    """
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f'aff_config_{path.stem}', path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f'no config file {path}')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """``argv`` without its ``--config.KEY=VALUE`` arguments, and those as ``(KEY, VALUE)``
    (VALUE None for a bare ``--config.KEY``).

    They are applied by ``apply_overrides`` rather than by absl, whose errors for an unknown
    key run to dozens of lines and which cannot add ``model_overrides`` keys.
    """
    rest, overrides = [], []
    for arg in argv:
        if not arg.startswith(OVERRIDE_PREFIX):
            rest.append(arg)
            continue
        key, equals, value = arg[len(OVERRIDE_PREFIX):].partition('=')
        overrides.append((key, value if equals else None))
    return rest, overrides


def load_with_overrides(spec: str, overrides: list[tuple[str, str | None]]
                        ) -> ml_collections.ConfigDict:
    """The config of ``--config=SPEC`` with ``overrides`` (from ``split_overrides``) applied.

    SPEC is ``PATH.py`` (``get_config()``) or ``PATH.py:ARG`` (``get_config(ARG)``). Raises
    ConfigError naming the option or key: no such file, an override without a value, and what
    ``apply_overrides`` rejects.
    """
    file, colon, arg = spec.partition('.py:')
    file = file + '.py' if colon else spec
    try:
        config = load_config(file, *([arg] if colon else []))
    except FileNotFoundError as e:
        raise ConfigError(f'--config: {e}') from e
    for key, value in overrides:
        if value is None:
            raise ConfigError(f'--config.{key} needs a value: --config.{key}=VALUE')
    apply_overrides(config, overrides)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> None:
    """Set ``config[KEY] = VALUE`` for each ``(KEY, VALUE text)`` of ``--config.KEY=VALUE``.

    VALUE is read as a Python literal (``2``, ``0.1``, ``(8, 8, 16, 32)``, ``None``, ``True``)
    and must fit the key's type (an int for a float key is fine); for a string key the text is
    taken as is. Raises ConfigError naming the key: unknown keys (with the closest known ones),
    values of the wrong type. Keys under ``OPEN_KEYS`` may be new; their values are literals, or
    strings where the text is not one.
    """
    for key, text in overrides:
        *parents, leaf = key.split('.')
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                _unknown_key(config, key)
            node = node[part]
        is_open = bool(parents) and parents[-1] in OPEN_KEYS
        if leaf not in node and not is_open:
            _unknown_key(config, key)
        if leaf in node and isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(f'config.{key} is a group of keys; set config.{key}.NAME=VALUE')
        wanted = node.get_ref(leaf).get_type() if leaf in node else None
        value = _parse_value(key, text, wanted)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f'config.{key} must be of type {wanted.__name__}, got {text!r}') from e


def _parse_value(key: str, text: str, wanted: type | None):
    if wanted is str:
        return None if text == 'None' else text
    if wanted is bool and text.lower() in ('true', 'false'):
        return text.lower() == 'true'
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        if wanted is None:
            return text
        raise ConfigError(f'config.{key} must be of type {wanted.__name__}, got {text!r}') from e


def _unknown_key(config: ml_collections.ConfigDict, key: str):
    raise ConfigError(f'config.{key}: unknown config key{unknown_key_hint(config, key)}')


def unknown_key_hint(config: ml_collections.ConfigDict, key: str) -> str:
    """``'; did you mean A or B?'`` with the (dotted) keys of ``config`` closest to ``key``, or
    a pointer to the list of keys when none is close."""
    close = difflib.get_close_matches(key, list(_flat_keys(config)), n=3, cutoff=0.6)
    return f'; did you mean {" or ".join(close)}?' if close else '; see aff_jax/training/config.py'


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = ''):
    for name in config.keys():
        value = config[name]
        if isinstance(value, ml_collections.ConfigDict) and len(value):
            yield from _flat_keys(value, f'{prefix}{name}.')
        else:
            yield f'{prefix}{name}'


def from_tree(tree: dict) -> ml_collections.ConfigDict:
    """A config saved as JSON (a checkpoint's, a sweep cell's ``config.json``) with the types
    of ``base_config()``: lists as tuples, sub-dicts as ConfigDicts, keys it lacks added."""
    config = base_config()
    _fill(config, tree)
    return config


def _fill(node: ml_collections.ConfigDict, tree: dict) -> None:
    for key, value in tree.items():
        if isinstance(value, dict):
            if key not in node:
                node[key] = ml_collections.ConfigDict()
            _fill(node[key], value)
        else:
            node[key] = as_tuples(value)


def as_tuples(value):
    """Lists (from JSON or a command line) as tuples, as configs hold them, hashable."""
    return tuple(map(as_tuples, value)) if isinstance(value, (list, tuple)) else value


def changed_keys(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    """``'key: old -> new'`` for every key whose value differs between a checkpoint's saved
    config (as JSON) and ``current``; nested keys are dotted (``model_overrides.layers``)."""
    def flatten(tree, prefix=''):
        if isinstance(tree, dict):
            return {k: v for key, value in tree.items()
                    for k, v in flatten(value, f'{prefix}{key}.').items()}
        return {prefix[:-1]: tree}

    old, new = flatten(saved), flatten(json.loads(current.to_json()))
    return [f'{key}: {old.get(key)!r} -> {new.get(key)!r}'
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
