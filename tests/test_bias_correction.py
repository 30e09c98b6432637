import numpy as np
import pytest

from edgekit.compress.bias_correction import dequantize, output_shift


def _conv_mean_output(x, w, group):
    """Mean over batch and positions of a 1x1-equivalent conv output: use the 'valid' interior via explicit sums."""
    import torch

    with torch.no_grad():
        y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), groups=group)
    return y.numpy().mean(axis=(0, 2, 3))


@pytest.mark.parametrize("group, cin, cout", [(1, 6, 4), (3, 6, 6), (6, 6, 6)])
def test_conv_shift_equals_the_change_of_mean_output(group, cin, cout):
    rng = np.random.default_rng(group)
    x = rng.normal(1.0, 0.5, size=(16, cin, 9, 9)).astype(np.float32)
    w = rng.normal(size=(cout, cin // group, 3, 3)).astype(np.float32)
    w_q = w + rng.normal(scale=0.05, size=w.shape).astype(np.float32)
    # with 'valid' convolution every output position sees a full window; E[x] over the windows ~ E[x] per channel
    want = _conv_mean_output(x, w_q, group) - _conv_mean_output(x, w, group)
    got = output_shift(w, w_q, x.mean(axis=(0, 2, 3)), group=group)
    np.testing.assert_allclose(got, want, rtol=0.05, atol=5e-3)


def test_gemm_shift_is_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, size=(100, 5))
    w = rng.normal(size=(3, 5))
    w_q = w + rng.normal(scale=0.1, size=w.shape)
    want = (x @ w_q.T).mean(0) - (x @ w.T).mean(0)
    np.testing.assert_allclose(output_shift(w, w_q, x.mean(0)), want, rtol=1e-10)
    np.testing.assert_allclose(output_shift(w.T, w_q.T, x.mean(0), trans_b=False), want, rtol=1e-10)


def test_dequantize_per_axis_and_per_tensor():
    q = np.array([[1, -2], [3, 4]], np.int8)
    np.testing.assert_allclose(dequantize(q, np.array([0.5, 2.0], np.float32), None, axis=0),
                               [[0.5, -1.0], [6.0, 8.0]])
    np.testing.assert_allclose(dequantize(q, np.array(0.5, np.float32), np.array(1, np.int8), axis=0),
                               [[0.0, -1.5], [1.0, 1.5]])
