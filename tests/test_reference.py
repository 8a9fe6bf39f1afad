"""Every contract of the reference backend against autograd of plain torch ops, in float64.

Odd shapes: C in {3, 17}, H=W in {7, 9}, stride 1 and 2, batch 1 and 2, 1x1 and 3x3 kernels.
Tolerance: 1e-10 relative to the largest magnitude (float64 against float64).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from preact_fused import reference

F64 = torch.float64
CASES = [  # (n, cin, cout, hw, k, stride)
    (n, cin, cout, hw, k, s)
    for (n, cin, cout), hw, (k, s) in itertools.product(
        [(1, 3, 17), (2, 17, 3)], [7, 9], [(3, 1), (3, 2), (1, 1), (1, 2)])
]


def close(actual, expected, rtol=1e-10):
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-30)
    assert err <= rtol, f"relative error {err:.2e}"


def eager_triple(x, w, gamma, beta, stride, padding, residual, training=True, running=None):
    """relu(batch_norm(x)) -> conv2d [+ residual], by plain torch ops with autograd."""
    rm, rv = running if running is not None else (None, None)
    z = F.batch_norm(x, rm, rv, gamma, beta, training=training, momentum=0.1, eps=1e-5)
    z.retain_grad()
    y = F.conv2d(F.relu(z), w, stride=stride, padding=padding)
    return (y if residual is None else y + residual), z


def random_case(n, cin, cout, hw, k, stride, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho = (hw + 2 * (k // 2) - k) // stride + 1
    x = torch.randn(n, cin, hw, hw, generator=g, dtype=F64) * 3 + 1
    w = torch.randn(cout, cin, k, k, generator=g, dtype=F64)
    gamma = torch.rand(cin, generator=g, dtype=F64) + 0.5
    beta = torch.randn(cin, generator=g, dtype=F64)
    residual = torch.randn(n, cout, ho, ho, generator=g, dtype=F64)
    dy = torch.randn(n, cout, ho, ho, generator=g, dtype=F64)
    return x, w, gamma, beta, residual, dy


@pytest.mark.parametrize("case", CASES)
def test_forward_stats_and_backward_match_autograd(case):
    n, cin, cout, hw, k, stride = case
    pad = k // 2
    x, w, gamma, beta, residual, dy = random_case(*case)
    leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta, residual)]
    y_ref, z = eager_triple(*leaves[:4], stride, pad, leaves[4])
    y_ref.backward(dy)
    dx_ref, dw_ref, dgamma_ref, dbeta_ref, dres_ref = (t.grad for t in leaves)

    mean, invstd, scale, shift = reference.bn_finalize(reference.bn_stats(x), gamma, beta, 1e-5)
    y, partials = reference.conv_fwd(x, w, stride, pad, scale, shift, residual, want_stats=True)
    close(y, y_ref.detach())
    count, part_mean, m2 = partials.unbind(0)
    total = count.sum(0)
    merged = (count * part_mean).sum(0) / total
    var = (m2 + count * (part_mean - merged) ** 2).sum(0) / total
    var_ref, mean_ref = torch.var_mean(y_ref.detach(), dim=(0, 2, 3), unbiased=False)
    close(merged, mean_ref)
    close(var, var_ref)

    g, sum_g, sum_gx = reference.conv_dgrad(dy, w, x, stride, pad, scale, shift, mean)
    close(g, z.grad)
    dx = reference.bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx, training=True)
    close(dx, dx_ref)
    close(sum_gx * invstd, dgamma_ref)
    close(sum_g, dbeta_ref)
    close(reference.conv_wgrad(x, dy, w.shape, stride, pad, scale, shift), dw_ref)
    close(dy, dres_ref)


@pytest.mark.parametrize("case", CASES[:4])
def test_identity_loader_matches_plain_conv(case):
    n, cin, cout, hw, k, stride = case
    x, w, _, _, _, dy = random_case(*case)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = F.conv2d(xl, wl, stride=stride, padding=k // 2)
    y_ref.backward(dy)
    y, partials = reference.conv_fwd(x, w, stride, k // 2)
    assert partials is None
    close(y, y_ref.detach())
    dx, none_g, none_gx = reference.conv_dgrad(dy, w, x, stride, k // 2)
    assert none_g is None and none_gx is None
    close(dx, xl.grad)
    close(reference.conv_wgrad(x, dy, w.shape, stride, k // 2), wl.grad)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_finalize_running_stats_match_batch_norm(momentum):
    x, *_ = random_case(1, 17, 3, 9, 3, 1)
    rm, rv = torch.randn(17, dtype=F64), torch.rand(17, dtype=F64) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    nbt = torch.tensor(4)
    factor = 0.25 if momentum is None else momentum
    F.batch_norm(x, rm_ref, rv_ref, training=True, momentum=factor, eps=1e-5)
    mean, invstd, scale, shift = reference.bn_finalize(reference.bn_stats(x), None, None, 1e-5, rm, rv, momentum, nbt)
    close(rm, rm_ref)
    close(rv, rv_ref)
    close(scale, invstd)
    close(shift, -mean * invstd)


def test_eval_mode_backward_matches_autograd():
    x, w, gamma, beta, _, dy = random_case(2, 3, 17, 7, 3, 2)
    rm, rv = torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5
    xl = x.clone().requires_grad_()
    y_ref, _ = eager_triple(xl, w, gamma, beta, 2, 1, None, training=False, running=(rm, rv))
    y_ref.backward(dy)
    invstd = torch.rsqrt(rv + 1e-5)
    scale, shift = gamma * invstd, beta - rm * gamma * invstd
    y, _ = reference.conv_fwd(x, w, 2, 1, scale, shift)
    close(y, y_ref.detach())
    g, sum_g, sum_gx = reference.conv_dgrad(dy, w, x, 2, 1, scale, shift, rm)
    close(reference.bn_backward(g, x, rm, invstd, scale, sum_g, sum_gx, training=False), xl.grad)


def test_statistics_survive_a_large_mean():
    """|mean| = 1e4 x std: the Chan merge of per-tile (count, mean, M2) keeps the variance."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 9, 9, generator=g) * 0.01 + 100.0   # float32 data
    mean, invstd, _, _ = reference.bn_finalize(reference.bn_stats(x), None, None, 0.0)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    close(mean.double(), mean_ref, 1e-6)
    close((1 / invstd.double() ** 2), var_ref, 1e-3)


def test_shared_bn_backward_is_additive():
    """Two convs reading one BN-ReLU: separate BN backwards add up to the joint gradient."""
    x, w, gamma, beta, _, dy = random_case(1, 17, 3, 9, 3, 1)
    w2 = torch.randn(5, 17, 1, 1, dtype=F64)
    dy2 = torch.randn(1, 5, 9, 9, dtype=F64)
    xl = x.clone().requires_grad_()
    a = F.relu(F.batch_norm(xl, None, None, gamma, beta, training=True, eps=1e-5))
    (F.conv2d(a, w, padding=1) * dy).sum().add((F.conv2d(a, w2) * dy2).sum()).backward()
    mean, invstd, scale, shift = reference.bn_finalize(reference.bn_stats(x), gamma, beta, 1e-5)
    dx = 0
    for weight, grad, pad in ((w, dy, 1), (w2, dy2, 0)):
        g, sum_g, sum_gx = reference.conv_dgrad(grad, weight, x, 1, pad, scale, shift, mean)
        dx = dx + reference.bn_backward(g, x, mean, invstd, scale, sum_g, sum_gx)
    close(dx, xl.grad)
