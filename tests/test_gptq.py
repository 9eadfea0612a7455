"""GPTQ against a straight-line implementation of the paper's Algorithm 1."""

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.quant.gptq import gptq_quantize
from slimlm.quant.grid import fake_quantize, find_params, group_bounds


def correlated_problem(rows=24, columns=64, tokens=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5
    X = torch.randn(tokens, columns, generator=generator) @ (torch.eye(columns) + mixing)
    W = torch.randn(rows, columns, generator=generator)
    return W, 2 * X.T @ X / tokens, X


def straight_line_gptq(W, H, bits, group_size, symmetric, dampening, order=None):
    """Algorithm 1 without the lazy batches and the Cholesky trick: quantize one column, spread its
    error with the current inverse Hessian (OBS update), remove the column from the inverse (Eq. 3)."""
    W, H = W.clone().double(), H.clone().double()
    columns = W.shape[1]
    H.diagonal().add_(dampening * H.diagonal().mean())
    order = list(range(columns)) if order is None else order
    Hinv = torch.linalg.inv(H[order][:, order])
    W = W[:, order]
    Q = torch.zeros_like(W)
    bounds = group_bounds(columns, group_size)
    static = find_params(W.float(), bits, symmetric) if group_size is None else None
    for j in range(columns):
        if static is not None:
            scale, zero = static
        elif any(start == j for start, _ in bounds):
            end = next(end for start, end in bounds if start == j)
            scale, zero = find_params(W[:, j:end].float(), bits, symmetric)
        q = fake_quantize(W[:, j : j + 1].float(), scale, zero, bits)[:, 0].double()
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    inverse = torch.argsort(torch.tensor(order))
    return Q[:, inverse].float()


@pytest.mark.parametrize(("group_size", "symmetric", "block_size"), [(None, False, 128), (16, False, 16), (16, True, 32), (8, False, 128)])
def test_matches_algorithm_1(group_size, symmetric, block_size):
    W, H, _ = correlated_problem()
    quantized, _ = gptq_quantize(W, H, bits=3, group_size=group_size, symmetric=symmetric, dampening=0.01,
                                 block_size=block_size)
    expected = straight_line_gptq(W, H, 3, group_size, symmetric, 0.01)
    assert_same_up_to_rounding_ties(quantized, expected)


def assert_same_up_to_rounding_ties(quantized, expected, max_rows: int = 2) -> None:
    """Equal to the float64 reference, except that a row may part from it where a weight sat on a rounding
    boundary (float32 and float64 round such a tie apart): there the first difference is one grid step, and
    the rest of that row follows from it. A wrong update would make most rows differ."""
    difference = (quantized.dequantize() - expected).abs()
    rows = (difference > 1e-4).any(dim=1).nonzero().flatten().tolist()
    assert len(rows) <= max_rows, f"rows {rows} differ from Algorithm 1"
    bounds = group_bounds(expected.shape[1], quantized.group_size) if quantized.group_size else [(0, expected.shape[1])]
    for row in rows:
        column = int((difference[row] > 1e-4).nonzero()[0])
        group = next(g for g, (start, end) in enumerate(bounds) if start <= column < end)
        step = float(quantized.scale[row, min(group, quantized.scale.shape[1] - 1)])
        assert abs(float(difference[row, column]) - step) < 1e-3 * step, (row, column)


def test_act_order_matches_algorithm_1_in_permuted_order():
    W, H, _ = correlated_problem()
    quantized, _ = gptq_quantize(W, H, bits=3, group_size=None, symmetric=False, act_order=True)
    order = torch.argsort(torch.diag(H), descending=True).tolist()
    assert torch.allclose(quantized.dequantize(), straight_line_gptq(W, H, 3, None, False, 0.01, order), atol=1e-4)


def test_act_order_groups_record_g_idx_and_static_groups_do_not():
    W, H, _ = correlated_problem()
    dynamic, _ = gptq_quantize(W, H, bits=4, group_size=16, symmetric=False, act_order=True)
    assert dynamic.g_idx is not None and sorted(torch.bincount(dynamic.g_idx).tolist()) == [16] * 4
    static, _ = gptq_quantize(W, H, bits=4, group_size=16, symmetric=False, act_order=True, static_groups=True)
    assert static.g_idx is None


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits):
    W, H, X = correlated_problem(seed=bits)
    quantized, _ = gptq_quantize(W, H, bits=bits, group_size=16, symmetric=False)
    scale_zero = [find_params(W[:, s:e], bits, False) for s, e in group_bounds(64, 16)]
    rtn = torch.cat([fake_quantize(W[:, s:e], *sz, bits) for (s, e), sz in zip(group_bounds(64, 16), scale_zero)], 1)
    gptq_error = (X @ (quantized.dequantize() - W).T).pow(2).sum()
    rtn_error = (X @ (rtn - W).T).pow(2).sum()
    assert gptq_error < 0.9 * rtn_error


def test_shorter_last_group_and_dead_columns():
    W, H, _ = correlated_problem(columns=40)
    H[5, :] = H[:, 5] = 0  # an input that never fires
    quantized, _ = gptq_quantize(W, H, bits=4, group_size=16, symmetric=False)
    assert quantized.scale.shape == (24, 3)  # 16 + 16 + 8
    assert torch.all(quantized.dequantize()[:, 5] == 0)


def test_indefinite_hessian_is_a_clear_error():
    W, _, _ = correlated_problem()
    with pytest.raises(SlimlmError, match="not positive definite"):
        gptq_quantize(W, -torch.eye(64), bits=4, group_size=None, symmetric=False, dampening=0.01)


@pytest.mark.parametrize(("symmetric", "act_order", "static_groups", "group_size"),
                         [(True, True, True, 16), (False, True, False, 16), (True, False, False, 24)])
def test_scale_refit_keeps_the_codes_and_lowers_the_layer_output_error(symmetric, act_order, static_groups, group_size):
    """refit_scales: the least-squares group scales (codes fixed) never raise GPTQ's objective, and are its
    minimiser: no other scale of any group lowers it (checked by nudging each group's scale both ways)."""
    from slimlm.core.hessian import prepare_hessian

    W, H, _ = correlated_problem()
    kwargs = dict(bits=3, group_size=group_size, symmetric=symmetric, act_order=act_order, static_groups=static_groups)
    plain, _ = gptq_quantize(W, H, **kwargs)
    refit, _ = gptq_quantize(W, H, **kwargs, refit_scales=True)
    assert torch.equal(plain.codes, refit.codes) and torch.equal(plain.zero, refit.zero)
    assert not torch.equal(plain.scale, refit.scale)
    damped, _ = prepare_hessian(H, W, 0.01)

    def objective(quantized) -> torch.Tensor:  # per row (w - w^)^T H (w - w^)
        error = W - quantized.dequantize()
        return ((error @ damped) * error).sum(dim=1)

    assert bool((objective(refit) <= objective(plain) * (1 + 1e-5)).all())
    assert float(objective(refit).sum()) < 0.99 * float(objective(plain).sum())
    for group in range(refit.n_groups):
        for factor in (0.99, 1.01):
            nudged = refit.scale.clone()
            nudged[:, group] *= factor
            moved = type(refit)(**{**refit.__dict__, "scale": nudged})
            assert bool((objective(moved) >= objective(refit) * (1 - 1e-5)).all())


def test_relative_dampening_moves_gptq_toward_round_to_nearest():
    """relative_dampening shrinks the input correlations: very large, the sweep rounds each column to nearest
    (GPTQ on the diagonal of H); in between, its layer-output error lies between the two."""
    W, H, X = correlated_problem()
    kwargs = dict(bits=3, group_size=16, symmetric=True, act_order=True, static_groups=True, clip="weighted_lsq")
    nearest, _ = gptq_quantize(W, torch.diag(torch.diag(H)), **kwargs)
    huge, _ = gptq_quantize(W, H, **kwargs, relative_dampening=1e6)
    assert float((huge.codes != nearest.codes).float().mean()) < 0.01  # rounding ties aside
    errors = [float((X @ (gptq_quantize(W, H, **kwargs, relative_dampening=delta)[0].dequantize() - W).T).pow(2).sum())
              for delta in (0.0, 1.0)]
    nearest_error = float((X @ (nearest.dequantize() - W).T).pow(2).sum())
    assert errors[0] < errors[1] < nearest_error
