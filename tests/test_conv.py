"""The convolution with GEMM weight gradients (aff_jax.conv) against XLA's own convolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from aff_jax import conv as conv_lib
from aff_jax.layers import Conv2D

CASES = {  # kernel, stride, padding, dilation, groups, C_in, C_out
    '3x3': (3, 1, ((1, 1), (1, 1)), 1, 1, 8, 12),
    '3x3 stride 2': (3, 2, ((1, 1), (1, 1)), 1, 1, 8, 12),
    '3x3 dilation 2': (3, 1, ((2, 2), (2, 2)), 2, 1, 8, 12),
    '3x3 groups 4 stride 2': (3, 2, ((1, 1), (1, 1)), 1, 4, 8, 12),
    'depthwise': (3, 1, ((1, 1), (1, 1)), 1, 8, 8, 8),
    '1x1 (dot)': (1, 1, ((0, 0), (0, 0)), 1, 1, 8, 12),
    '1x1 stride 2 (dot)': (1, 2, ((0, 0), (0, 0)), 1, 1, 8, 12),
    '1x1 padded': (1, 1, ((1, 1), (1, 1)), 1, 1, 8, 12),
    '7x7 stride 2 stem': (7, 2, ((3, 3), (3, 3)), 1, 1, 3, 8),
    'asymmetric padding, dilation and stride 2, groups 2': (3, 2, ((0, 1), (2, 1)), 2, 2, 8, 6),
    '2x3 kernel, unequal strides': ((2, 3), (2, 1), ((1, 0), (1, 1)), (1, 2), 1, 4, 5),
}


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _xla(x, w, stride, padding, dilation, groups):
    return lax.conv_general_dilated(x, w, stride, padding, rhs_dilation=dilation,
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    feature_group_count=groups)


def _check_against_xla(x, w, stride, padding, dilation, groups):
    """conv2d's value and gradients (with the implementation in effect) against XLA's
    convolution; returns conv2d jitted, for a look at what it lowers to."""
    out = _xla(x, w, stride, padding, dilation, groups)
    # A random cotangent, so that every output position weighs differently.
    g = jax.random.normal(jax.random.key(7), out.shape)

    def loss(f):
        return lambda x, w: jnp.vdot(f(x, w, stride, padding, dilation, groups), g)

    ours = jax.jit(lambda x, w: conv_lib.conv2d(x, w, stride, padding, dilation, groups))
    np.testing.assert_allclose(ours(x, w), out, rtol=1e-5, atol=1e-5 * float(jnp.abs(out).max()))
    dx, dw = jax.jit(jax.grad(loss(conv_lib.conv2d), (0, 1)))(x, w)
    dx_ref, dw_ref = jax.grad(loss(_xla), (0, 1))(x, w)
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    return ours


@pytest.mark.parametrize('implementation', conv_lib.IMPLEMENTATIONS)
@pytest.mark.parametrize('case', list(CASES))
def test_value_and_gradients_equal_xla(case, implementation):
    kernel, stride, padding, dilation, groups, cin, cout = CASES[case]
    kernel, stride, dilation = _pair(kernel), _pair(stride), _pair(dilation)
    kx, kw = jax.random.split(jax.random.key(0))
    with conv_lib.implementation(implementation):
        _check_against_xla(jax.random.normal(kx, (3, 11, 10, cin)),
                           jax.random.normal(kw, (*kernel, cin // groups, cout)),
                           stride, padding, dilation, groups)


SMALL_MAPS = {  # input (H, W), kernel, stride, padding, dilation, groups, C_in, C_out
    '2x2 map, 3x3 kernel (an ImageNet ResNet\'s last stage at 64x64)': ((2, 2), 3, 1, ((1, 1), (1, 1)), 1, 1, 8, 12),
    '1x3 map, stride 2, groups 2': ((1, 3), 3, 2, ((1, 1), (1, 1)), 1, 2, 8, 6),
    '2x2 map, dilation 2, asymmetric padding': ((2, 2), 3, 1, ((2, 1), (1, 2)), 2, 1, 4, 5),
}


@pytest.mark.parametrize('implementation', conv_lib.IMPLEMENTATIONS)
@pytest.mark.parametrize('case', list(SMALL_MAPS))
def test_map_smaller_than_kernel_is_a_product_equal_to_xla(case, implementation):
    """A map with fewer pixels than the kernel has taps goes through one product of the stacked
    taps (XLA would swap the convolution's operands, a slow kernel on CPU); same values and
    gradients as XLA's convolution."""
    size, kernel, stride, padding, dilation, groups, cin, cout = SMALL_MAPS[case]
    kernel, stride, dilation = _pair(kernel), _pair(stride), _pair(dilation)
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (3, *size, cin))
    w = jax.random.normal(kw, (*kernel, cin // groups, cout))
    with conv_lib.implementation(implementation):
        ours = _check_against_xla(x, w, stride, padding, dilation, groups)
        assert 'convolution' not in ours.lower(x, w).as_text()


def test_weight_gradient_against_numpy_loops():
    """The GEMM weight gradient against the definition, written as loops in float64."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 6, 4))
    stride, padding, dilation, groups = (2, 1), ((1, 2), (0, 1)), (2, 1), 2
    kh, kw, cout = 3, 2, 6
    h_out = (7 + 3 - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (6 + 1 - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    g = rng.standard_normal((2, h_out, w_out, cout))
    xp = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    cin_g, cout_g = 4 // groups, cout // groups
    want = np.zeros((kh, kw, cin_g, cout))
    for i in range(kh):
        for j in range(kw):
            for o in range(cout):
                group = o // cout_g
                for c in range(cin_g):
                    for a in range(h_out):
                        for b in range(w_out):
                            want[i, j, c, o] += np.sum(
                                xp[:, a * stride[0] + i * dilation[0],
                                   b * stride[1] + j * dilation[1], group * cin_g + c]
                                * g[:, a, b, o])
    got = conv_lib.weight_gradient(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32),
                                   (kh, kw, cin_g, cout), stride, padding, dilation, groups)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_the_kernel_dtype():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4), jnp.bfloat16)
    pad = ((1, 1), (1, 1))
    dw = jax.grad(lambda w: conv_lib.conv2d(x, w, (1, 1), pad).astype(jnp.float32).sum())(w)
    dw_ref = jax.grad(lambda w: _xla(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), pad,
                                     (1, 1), 1).sum())(w)
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(dw.astype(jnp.float32), dw_ref, rtol=2e-2, atol=0.05)


def test_bad_input_names_the_problem():
    x = jnp.zeros((1, 8, 8, 6))
    with pytest.raises(ValueError, match='6 channels'):
        conv_lib.conv2d(x, jnp.zeros((3, 3, 4, 4)), padding=((1, 1), (1, 1)))
    with pytest.raises(ValueError, match='non-negative'):
        conv_lib.conv2d(x, jnp.zeros((3, 3, 6, 4)), padding=((-1, 1), (1, 1)))
    with pytest.raises(ValueError, match='groups=4'):
        Conv2D(8, 3, groups=4, name='conv').init(jax.random.key(0), x)


def test_module_parameters_match_flax_conv():
    """Conv2D keeps nn.Conv's parameter names, shapes and initial values (checkpoints and
    converted weights depend on them) and computes the same function."""
    import flax.linen as nn
    from aff_jax.layers import conv_kernel_init

    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 8))
    ours = Conv2D(16, 3, stride=2, padding=1, groups=2, use_bias=True)
    flax_conv = nn.Conv(16, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                        feature_group_count=2, kernel_init=conv_kernel_init)
    variables = ours.init(jax.random.key(3), x)
    reference = flax_conv.init(jax.random.key(3), x)
    params = nn.unbox(variables)['params']
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference['params'])
    np.testing.assert_array_equal(params['kernel'], reference['params']['kernel'])
    np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(reference, x),
                               rtol=1e-5, atol=1e-5)


def test_apply_checks_parameter_shapes_without_running_initializers(monkeypatch):
    """layers.param: init draws each kernel once; apply draws none (flax's own check traces the
    initializer again for every parameter) and still names a mis-shaped parameter."""
    import flax
    from aff_jax import layers

    draws = []

    def counting_init(key, shape, dtype=jnp.float32):
        draws.append(shape)
        return jax.random.normal(key, shape, dtype)

    monkeypatch.setattr(layers, 'conv_kernel_init', counting_init)
    x = jnp.ones((2, 5, 5, 4))
    conv = Conv2D(6, 3, padding=1, use_bias=True)
    variables = conv.init(jax.random.key(0), x)
    assert draws == [(3, 3, 4, 6)]
    conv.apply(variables, x)
    jax.jit(conv.apply)(variables, x)
    assert draws == [(3, 3, 4, 6)]
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r'"kernel".*\(3, 3, 5, 6\)'):
        conv.apply(variables, jnp.ones((2, 5, 5, 5)))


def test_xla_implementation_traces_xla_convolutions_only():
    x, w1, w3 = jnp.ones((2, 6, 6, 4)), jnp.ones((1, 1, 4, 4)), jnp.ones((3, 3, 4, 4))

    def loss(w1, w3):
        h = conv_lib.conv2d(x, w1)
        return conv_lib.conv2d(h, w3, padding=((1, 1), (1, 1))).sum()

    def lowered(platform):
        step = jax.jit(jax.grad(loss, (0, 1))).trace(w1, w3)
        return step.lower(lowering_platforms=(platform,)).as_text()

    with conv_lib.implementation('gemm'):
        gemm = lowered('cpu')
    xla = lowered('cpu')
    assert 'dot_general' in gemm
    assert 'dot_general' not in xla
    assert xla.count('stablehlo.convolution') >= 4  # two forward, their input and weight grads
    # Elsewhere the 1x1 convolution is differentiated as a dot, as under 'gemm'.
    assert 'dot_general' in lowered('cuda')
    # Evaluated without a gradient, the 1x1 convolution is a dot in both implementations.
    for name in conv_lib.IMPLEMENTATIONS:
        with conv_lib.implementation(name):
            forward = jax.jit(lambda x, w1: conv_lib.conv2d(x, w1)).lower(x, w1).as_text()
        assert 'dot_general' in forward and 'convolution' not in forward
    with pytest.raises(ValueError, match="'xla', 'gemm'"):
        with conv_lib.implementation('oneDNN'):
            pass


def test_cpu_compiler_options_take_convolutions_off_ynnpack(monkeypatch, on_cpu):
    """The options reach XLA:CPU (no YNNPACK fusion left around the convolutions, the dot
    still in one) and change nothing beyond float32 rounding."""
    rng = np.random.default_rng(0)
    # Large enough for XLA to hand the convolution to YNNPACK by default (4x8x8x16 is not).
    x = jnp.asarray(0.1 * rng.standard_normal((8, 16, 16, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)), jnp.float32)
    m = jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)

    def f(x, w, m):
        h = conv_lib.conv2d(x, w, padding=((1, 1), (1, 1)))
        return jnp.tanh(h) @ m

    def compiled(options):
        program = jax.jit(f, compiler_options=options).lower(x, w, m).compile()
        return program.as_text(), program(x, w, m)

    default_text, default_out = compiled(None)
    text, out = compiled(conv_lib.compiler_options('cpu'))
    def ynn_fusions(text):
        return [line for line in text.splitlines() if '%ynn_fusion' in line and ' = ' in line]
    assert any('conv_general_dilated' in line for line in ynn_fusions(default_text))
    assert any('dot_general' in line for line in ynn_fusions(text))
    assert not any('conv_general_dilated' in line for line in ynn_fusions(text))
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h = sum(np.einsum('nhwc,co->nhwo', xp[:, i:i + 16, j:j + 16], np.asarray(w, np.float64)[i, j])
            for i in range(3) for j in range(3))
    reference = np.tanh(h) @ np.asarray(m, np.float64)
    for result in (out, default_out):  # float32 sums of 288 and 32 terms
        np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-4)
    assert conv_lib.compiler_options('gpu') is None
    monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=')
    assert conv_lib.compiler_options('cpu') is None  # the user's choice stands


def test_config_names_a_bad_conv_implementation():
    from aff_jax.training import loop
    from aff_jax.training.config import base_config
    from aff_jax.training.errors import ConfigError

    config = base_config()
    config.conv_implementation = 'cudnn'
    with pytest.raises(ConfigError, match='conv_implementation'):
        loop.check_config(config)


def test_config_numerics_reach_what_is_traced_inside():
    """``loop.numerics``: the config's conv implementation and matmul precision hold for code
    traced inside it (the train and eval steps); a bad precision is named."""
    from aff_jax.training import loop
    from aff_jax.training.config import base_config
    from aff_jax.training.errors import ConfigError

    config = base_config()
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    conv = jax.jit(lambda x, w: conv_lib.conv2d(x, w, padding=((1, 1), (1, 1))))

    def traced():  # the program's text and whether the custom gradient (GEMM) was traced
        return conv.lower(x, w).as_text(), 'name=_conv' in str(jax.make_jaxpr(conv)(x, w))

    text, custom = traced()
    assert 'HIGHEST' not in text and not custom
    config.matmul_precision, config.conv_implementation = 'highest', 'gemm'
    with loop.numerics(config):
        text, custom = traced()
    assert 'HIGHEST' in text and custom
    config.matmul_precision = 'tf32'
    with pytest.raises(ConfigError, match="matmul_precision must be one of .*got 'tf32'"):
        loop.check_config(config)
