"""The reference backend's ops composed as the fused unit composes them, against autograd, in float64.

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


def fold(x, gamma, beta):
    return reference.bn_fold(reference.bn_stats(x), gamma, beta, eps=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_triple_composed_from_the_ops_matches_autograd(case):
    """conv_fwd (folding the statistics), conv_dgrad, bn_backward (residual gradient added) and
    conv_wgrad composed as the fused unit composes them, against autograd of the eager triple."""
    n, cin, cout, hw, k, stride = case
    pad = k // 2
    x, w, gamma, beta, residual, dy = random_case(*case)
    leaves = [t.clone().requires_grad_() for t in (x, w, gamma, beta, residual)]
    y_ref, z = eager_triple(*leaves[:4], stride, pad, leaves[4])
    y_ref.backward(dy)
    dx_ref, dw_ref, dgamma_ref, dbeta_ref, dres_ref = (t.grad for t in leaves)

    y, stats, f = reference.conv_fwd(x, w, stride, pad, stats=reference.bn_stats(x), gamma=gamma, beta=beta,
                                     residual=residual, want_stats=True)
    close(y, y_ref.detach())
    var_ref, mean_ref = torch.var_mean(y_ref.detach(), dim=(0, 2, 3), unbiased=False)
    close(stats[1] + stats[2], mean_ref)
    close(stats[3] / stats[0], var_ref)
    g, sums = reference.conv_dgrad(dy, w, x, stride, pad, f)
    close(g, z.grad)
    d_unit = torch.randn_like(x)
    dx = reference.bn_backward(g, x, f, sums, x.numel() / cin, True, d_unit)
    close(dx, dx_ref + d_unit)
    close(sums[2], dgamma_ref)
    close(sums[0], dbeta_ref)
    close(reference.conv_wgrad(x, dy, w, stride, pad, f), dw_ref)
    close(dy, dres_ref)


@pytest.mark.parametrize("case", CASES[:4])
def test_identity_loader_matches_plain_conv(case):
    n, cin, cout, hw, k, stride = case
    x, w, _, _, _, dy = random_case(*case)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_ref = F.conv2d(xl, wl, stride=stride, padding=k // 2)
    y_ref.backward(dy)
    y, stats, f = reference.conv_fwd(x, w, stride, k // 2)
    assert stats is None and f is None
    close(y, y_ref.detach())
    dx, sums = reference.conv_dgrad(dy, w, x, stride, k // 2)
    assert sums is None
    close(dx, xl.grad)
    close(reference.conv_wgrad(x, dy, w, stride, k // 2), wl.grad)


def test_shared_bn_backward_chains_through_d_residual():
    """Two convs reading one BN-ReLU: bn_backward of one fed as d_residual of the other gives the
    joint gradient (the BN backward is linear in (g, sums))."""
    x, w, gamma, beta, _, dy = random_case(1, 17, 3, 9, 3, 1)
    w2 = torch.randn(5, 17, 1, 1, dtype=F64)
    dy2 = torch.randn(1, 5, 9, 9, dtype=F64)
    xl = x.clone().requires_grad_()
    a = F.relu(F.batch_norm(xl, None, None, gamma, beta, training=True, eps=1e-5))
    (F.conv2d(a, w, padding=1) * dy).sum().add((F.conv2d(a, w2) * dy2).sum()).backward()
    f = fold(x, gamma, beta)
    dx = None
    for weight, grad, pad in ((w, dy, 1), (w2, dy2, 0)):
        g, sums = reference.conv_dgrad(grad, weight, x, 1, pad, f)
        dx = reference.bn_backward(g, x, f, sums, x.numel() / 17, True, dx)
    close(dx, xl.grad)
