"""ops/quantize.py: int8 rows with a scale each, and the projection that serves them."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from loramux.server.ops.quantize import QMAX, dequantize_int8, quantize_int8, select_int8_linear

# weights' magnitudes: zero, or normal floats whose scale (a 127th of a row's peak) is normal too
finite = st.one_of(st.just(0.0), st.floats(2.0**-64, 2.0**64, width=32), st.floats(-(2.0**64), -(2.0**-64), width=32))


@given(arrays("float32", st.tuples(st.integers(1, 6), st.integers(1, 9)), elements=finite))
def test_quantized_rows_are_within_half_a_step_of_the_weight(w):
    """Each row's scale is its largest magnitude over 127 (1 for a row of zeros), its values in
    [-127, 127] with the largest magnitude at ±127, and q * s within s / 2 of W (float32 rounding
    aside)."""
    w = torch.from_numpy(w)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
    assert q.abs().max() <= QMAX
    for row, qrow, s in zip(w, q, scale, strict=True):
        peak = float(row.abs().max())
        if peak == 0:
            assert s == 1 and (qrow == 0).all()
            continue
        assert math.isclose(float(s), peak / QMAX, rel_tol=1e-6)
        assert qrow.abs().max() == QMAX
        err = (row.double() - qrow.double() * float(s)).abs().max()
        assert err <= float(s) * (0.5 + 1e-5)


def test_bfloat16_weights_quantize_in_float32_and_non_finite_ones_are_refused():
    w = torch.randn(4, 16)
    q, scale = quantize_int8(w.bfloat16())
    expected_q, expected_scale = quantize_int8(w.bfloat16().float())
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)
    assert dequantize_int8(q, scale, torch.bfloat16).dtype == torch.bfloat16
    for bad in (float("nan"), float("inf")):
        w[2, 3] = bad
        with pytest.raises(ValueError, match="non-finite"):
            quantize_int8(w)


class Kernels:
    """A stand-in for the C++ module: the dequantized linear, each call's row count kept."""

    def __init__(self):
        self.calls = []

    def few_rows_linear(self, x, q, bias, scale):
        assert q.dtype == torch.int8 and scale.numel() == q.shape[0]
        self.calls.append(x.shape[0])
        return torch.nn.functional.linear(x, dequantize_int8(q, scale), bias if bias.numel() else None)


def test_int8_linear_takes_the_kernel_at_decode_counts_and_the_counts_given_else_the_dequantized_matmul():
    """Decode counts always; past them only the counts given (where float32 weights take the kernel)."""
    q, scale = quantize_int8(torch.randn(5, 8))
    bias = torch.randn(5)
    kernels = Kernels()
    linear, plain = select_int8_linear(kernels, {16, 200}), select_int8_linear(None, {200})
    for rows in (1, 16, 17, 64, 65, 200, 201):
        x = torch.randn(rows, 8)
        expected = torch.nn.functional.linear(x, dequantize_int8(q, scale), bias)
        torch.testing.assert_close(linear(x, q, scale, bias), expected)
        torch.testing.assert_close(plain(x, q, scale, bias), expected)
        torch.testing.assert_close(linear(x, q, scale), torch.nn.functional.linear(x, dequantize_int8(q, scale)))
    out = linear(torch.randn(3, 8, dtype=torch.float64), q, scale)
    assert out.dtype == torch.float64
    assert kernels.calls == [1, 1, 16, 16, 17, 17, 64, 64, 200, 200]
