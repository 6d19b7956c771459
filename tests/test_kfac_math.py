"""K-FAC / OBS math against brute force: costs are exact quadratic-loss increases, updates minimise."""

from __future__ import annotations

import pytest
import torch

from surgeon_fx import kfac


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return m @ m.T / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


def _quad_loss(dw, g, a):
    """1/2 vec(dW)^T (G kron A) vec(dW) with row-major vec: = 1/2 tr(dW^T G dW A)."""
    return 0.5 * torch.trace(dw.T @ g @ dw @ a)


def _brute_min(w, g, a, mask):
    """Minimise the quadratic loss over dW with dW[mask] = -W[mask], by solving the KKT system."""
    r, c = w.shape
    f = torch.kron(g, a)  # row-major vec
    fixed = mask.flatten()
    free = ~fixed
    x = torch.zeros(r * c, dtype=torch.float64)
    x[fixed] = -w.flatten()[fixed]
    # minimise 1/2 x^T F x over free coordinates: F_ff x_f = -F_fx x_x
    if free.any():
        x[free] = torch.linalg.solve(f[free][:, free], -f[free][:, fixed] @ x[fixed])
    dw = x.view(r, c)
    return dw, 0.5 * x @ f @ x


@pytest.mark.parametrize("seed", [0, 1])
def test_row_cost_and_update_are_the_constrained_optimum(seed):
    r, c = 6, 5
    g, a = _spd(r, seed), _spd(c, seed + 10)
    w = torch.randn(r, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rows = [1, 4]
    g_inv = torch.linalg.inv(g)
    mask = torch.zeros(r, c, dtype=torch.bool)
    mask[rows] = True
    dw_ref, loss_ref = _brute_min(w, g, a, mask)
    cost = kfac.row_costs(w, a, g_inv, [rows])[0]
    dw = kfac.row_update(w, g_inv, rows)
    torch.testing.assert_close(cost, loss_ref)
    torch.testing.assert_close(dw, dw_ref)
    torch.testing.assert_close(_quad_loss(dw, g, a), loss_ref)
    assert torch.allclose((w + dw)[rows], torch.zeros(2, c, dtype=torch.float64), atol=1e-12)
    # perturbing the free part of the update only increases the loss
    for k in range(3):
        noise = torch.randn(r, c, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64) * 0.1
        noise[rows] = 0
        assert _quad_loss(dw + noise, g, a) > loss_ref


@pytest.mark.parametrize("seed", [0, 1])
def test_col_cost_and_update_are_the_constrained_optimum(seed):
    r, c = 5, 7
    g, a = _spd(r, seed), _spd(c, seed + 3)
    w = torch.randn(r, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cols = [0, 3, 6]
    a_inv = torch.linalg.inv(a)
    mask = torch.zeros(r, c, dtype=torch.bool)
    mask[:, cols] = True
    dw_ref, loss_ref = _brute_min(w, g, a, mask)
    torch.testing.assert_close(kfac.col_costs(w, g, a_inv, [cols])[0], loss_ref)
    torch.testing.assert_close(kfac.col_update(w, a_inv, cols), dw_ref)


def test_single_row_and_column_costs_vectorised_match_blocks():
    r, c = 4, 6
    g, a = _spd(r, 5), _spd(c, 6)
    w = torch.randn(r, c, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gi, ai = torch.linalg.inv(g), torch.linalg.inv(a)
    torch.testing.assert_close(kfac.row_costs(w, a, gi), kfac.row_costs(w, a, gi, [[i] for i in range(r)]))
    torch.testing.assert_close(kfac.col_costs(w, g, ai), kfac.col_costs(w, g, ai, [[j] for j in range(c)]))


def test_diagonal_factors_equal_dense_diagonal_matrices():
    r, c = 5, 4
    gd = torch.rand(r, dtype=torch.float64) + 0.5
    ad = torch.rand(c, dtype=torch.float64) + 0.5
    w = torch.randn(r, c, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for blocks in (None, [[0, 2], [3]]):
        torch.testing.assert_close(
            kfac.row_costs(w, ad, 1 / gd, blocks), kfac.row_costs(w, torch.diag(ad), torch.diag(1 / gd), blocks)
        )
        torch.testing.assert_close(
            kfac.col_costs(w, gd, 1 / ad, blocks), kfac.col_costs(w, torch.diag(gd), torch.diag(1 / ad), blocks)
        )
    torch.testing.assert_close(kfac.row_update(w, 1 / gd, [1]), kfac.row_update(w, torch.diag(1 / gd), [1]))
    torch.testing.assert_close(kfac.col_update(w, 1 / ad, [2]), kfac.col_update(w, torch.diag(1 / ad), [2]))


def test_element_cost_is_single_entry_obs():
    r, c = 3, 4
    g, a = _spd(r, 1), _spd(c, 2)
    w = torch.randn(r, c, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    costs = kfac.element_costs(w, torch.linalg.inv(g), torch.linalg.inv(a))
    mask = torch.zeros(r, c, dtype=torch.bool)
    mask[2, 1] = True
    torch.testing.assert_close(costs[2, 1], _brute_min(w, g, a, mask)[1])


def test_damped_inverse_is_relative_to_the_diagonal():
    f = _spd(5, 3)
    inv = kfac.damped_inverse(f, 0.1)
    lam = 0.1 * torch.diagonal(f).mean()
    torch.testing.assert_close(inv, torch.linalg.inv(f + lam * torch.eye(5, dtype=torch.float64)))
    assert torch.isfinite(kfac.damped_inverse(torch.zeros(3, 3), 0.01)).all()  # dead layer
    torch.testing.assert_close(
        kfac.damped_inverse(torch.tensor([1.0, 3.0]), 0.5), 1 / torch.tensor([2.0, 4.0]).double()
    )


@pytest.mark.parametrize("remove", ["rows", "cols"])
def test_deep_linear_network_predicted_loss_change_is_exact(remove):
    """y = W2 W1 x with squared error: the Hessian w.r.t. W1 is exactly (W2^T W2) (x) E[x x^T], so at
    the optimum of W1 the OBS cost equals the true loss increase after the OBS update."""
    gen = torch.Generator().manual_seed(7)
    n, d_in, d_hid, d_out = 400, 6, 5, 7
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    w2 = torch.randn(d_out, d_hid, generator=gen, dtype=torch.float64)

    def loss(w1):
        return 0.5 * ((x @ w1.T @ w2.T - y) ** 2).sum(1).mean()

    a = x.T @ x / n
    g = w2.T @ w2
    w1 = torch.linalg.solve(g, w2.T @ (y.T @ x / n)) @ torch.linalg.inv(a)  # the optimum
    assert torch.autograd.functional.jacobian(loss, w1).abs().max() < 1e-10
    if remove == "rows":
        idx = [1, 3]
        cost = kfac.row_costs(w1, a, torch.linalg.inv(g), [idx])[0]
        dw = kfac.row_update(w1, torch.linalg.inv(g), idx)
    else:
        idx = [0, 4]
        cost = kfac.col_costs(w1, g, torch.linalg.inv(a), [idx])[0]
        dw = kfac.col_update(w1, torch.linalg.inv(a), idx)
    torch.testing.assert_close(loss(w1 + dw) - loss(w1), cost)


def test_fixed_costs_are_the_loss_without_compensation():
    r, c = 5, 6
    g, a = _spd(r, 11), _spd(c, 12)
    w = torch.randn(r, c, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rows, cols = [0, 2], [1, 5]
    dw = torch.zeros_like(w)
    dw[rows] = -w[rows]
    torch.testing.assert_close(kfac.row_costs_fixed(w, a, g, [rows])[0], _quad_loss(dw, g, a))
    dw = torch.zeros_like(w)
    dw[:, cols] = -w[:, cols]
    torch.testing.assert_close(kfac.col_costs_fixed(w, g, a, [cols])[0], _quad_loss(dw, g, a))
    torch.testing.assert_close(kfac.row_costs_fixed(w, a, g), kfac.row_costs_fixed(w, a, g, [[i] for i in range(r)]))
    torch.testing.assert_close(kfac.col_costs_fixed(w, g, a), kfac.col_costs_fixed(w, g, a, [[j] for j in range(c)]))
    # compensation never costs more than keeping the other weights fixed
    assert kfac.row_costs(w, a, torch.linalg.inv(g), [rows])[0] <= kfac.row_costs_fixed(w, a, g, [rows])[0]
