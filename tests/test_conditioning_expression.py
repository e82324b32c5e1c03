"""ExpressionContext (MorphDiff's L1000 -> context tokens): count, NumPy forward, seeding,
frozen versus learned variables, torch-default init bounds, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from morphjax.models.conditioning import ExpressionContext, FixedEmbedding
from morphjax.models.impa import count_params


def frozen_weights(module):
    state = nnx.to_pure_dict(nnx.state(module, FixedEmbedding))
    return np.asarray(state["kernel"]), np.asarray(state["bias"])


def test_reference_parameter_count():
    """notes section 2/5: Linear(977, 12 * 1024) with bias = 12,017,664 parameters."""
    frozen = nnx.eval_shape(lambda: ExpressionContext(seed=0))
    shapes = jax.tree.map(lambda v: v.shape, nnx.to_pure_dict(nnx.state(frozen, FixedEmbedding)))
    assert shapes == {"kernel": (977, 12288), "bias": (12288,)}
    assert 977 * 12288 + 12288 == 12_017_664
    assert count_params(frozen) == 0  # nothing trainable
    learned = nnx.eval_shape(lambda: ExpressionContext(mode="learned", rngs=nnx.Rngs(0)))
    assert count_params(learned) == 12_017_664


@pytest.mark.parametrize("mode", ["frozen_random", "learned"])
def test_forward_is_affine_map_reshaped(mode):
    module = ExpressionContext(50, num_tokens=4, context_dim=3, mode=mode, seed=1,
                               rngs=nnx.Rngs(0))
    if mode == "learned":
        kernel, bias = np.asarray(module.linear.kernel[...]), np.asarray(module.linear.bias[...])
    else:
        kernel, bias = frozen_weights(module)
    assert kernel.shape == (50, 12) and bias.shape == (12,)
    x = np.random.default_rng(0).normal(size=(5, 50))
    expected = (x @ kernel.astype(np.float64) + bias).reshape(5, 4, 3)
    got = np.asarray(module(jnp.asarray(x, jnp.float32)))
    assert got.shape == (5, 4, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Token j, channel d reads output feature j * 3 + d (row-major reshape).
    np.testing.assert_allclose(got[:, 2, 1], x @ kernel[:, 7] + bias[7], rtol=1e-5, atol=1e-5)


def test_seed_fixes_the_projection_whatever_the_rngs():
    a = ExpressionContext(40, 8, 4, seed=3, rngs=nnx.Rngs(0))
    b = ExpressionContext(40, 8, 4, seed=3, rngs=nnx.Rngs(123))
    c = ExpressionContext(40, 8, 4, seed=4, rngs=nnx.Rngs(0))
    for wa, wb, wc in zip(frozen_weights(a), frozen_weights(b), frozen_weights(c)):
        np.testing.assert_array_equal(wa, wb)
        assert not np.allclose(wa, wc)


def test_frozen_is_not_a_param_learned_is():
    frozen = ExpressionContext(40, 8, 4, seed=0)
    assert nnx.to_pure_dict(nnx.state(frozen, nnx.Param)) == {}
    assert set(nnx.to_pure_dict(nnx.state(frozen, FixedEmbedding))) == {"kernel", "bias"}
    learned = ExpressionContext(40, 8, 4, mode="learned", rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(learned, nnx.Param))
    assert params["linear"]["kernel"].shape == (40, 32)
    assert params["linear"]["bias"].shape == (32,)


@pytest.mark.parametrize("mode", ["frozen_random", "learned"])
def test_init_is_torch_default_uniform(mode):
    """torch nn.Linear: weight and bias ~ U(-1/sqrt(G), 1/sqrt(G)); sd = 1/sqrt(3G)."""
    genes = 977
    module = ExpressionContext(genes, 64, 12, mode=mode, seed=0, rngs=nnx.Rngs(0))
    if mode == "learned":
        kernel, bias = np.asarray(module.linear.kernel[...]), np.asarray(module.linear.bias[...])
    else:
        kernel, bias = frozen_weights(module)
    bound = 1 / np.sqrt(genes)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    assert np.abs(kernel).max() > 0.99 * bound  # uses the whole range, 750k draws
    np.testing.assert_allclose(kernel.std(), 1 / np.sqrt(3 * genes), rtol=0.01)
    assert abs(kernel.mean()) < 0.01 * bound
    np.testing.assert_allclose(bias.std(), 1 / np.sqrt(3 * genes), rtol=0.1)


def test_bad_arguments_name_the_problem():
    module = ExpressionContext(978, 8, 4, seed=0)
    with pytest.raises(ValueError, match="978"):
        module(jnp.zeros((2, 977)))
    with pytest.raises(ValueError, match="978"):
        module(jnp.zeros((978,)))
    with pytest.raises(ValueError, match="mode"):
        ExpressionContext(978, mode="random")
    with pytest.raises(ValueError, match="rngs"):
        ExpressionContext(978, mode="learned")
