"""The benchmark's own arithmetic and plumbing: roofline counts, max-batch bisection, CIFAR reader, a
CPU smoke run of the ResNet training benchmark."""
import importlib.util
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import preact_fused
from benchmarks.resnet1001 import check_losses, largest_batch, main
from benchmarks.roofline import conv_layers, step_bytes, step_flops
from preact_fused import reference
from preact_fused.data import TEST_FILES, TRAIN_FILES, load_cifar10, normalize, read_batch


class TinyNet(nn.Module):
    """stem conv3x3 (3 -> 4) on 4x4 images, one basic unit 4 -> 8 at stride 2 (projection shortcut),
    head BN-ReLU-pool-linear (8 -> 10): the layout ``preact_resnet`` builds, small enough to count."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(preact_fused.PreActBasicBlock(4, 8, stride=2, fused=False))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1))


def test_roofline_flops_hand_count():
    net = conv_layers(TinyNet(), image_hw=(4, 4))
    # Forward multiply-adds per image, Ho*Wo * Cout * Cin * K * K:
    stem = 4 * 4 * 4 * 3 * 9          # 4x4 out, 3 -> 4, 3x3
    shortcut = 2 * 2 * 8 * 4 * 1      # 2x2 out (stride 2), 4 -> 8, 1x1
    conv1 = 2 * 2 * 8 * 4 * 9         # 2x2 out (stride 2), 4 -> 8, 3x3
    conv2 = 2 * 2 * 8 * 8 * 9         # 2x2 out, 8 -> 8, 3x3
    fc = 8 * 10
    # Training step: forward + wgrad + dgrad (2 FLOPs per multiply-add); the stem has no dgrad.
    per_image = 2 * (2 * stem + 3 * (shortcut + conv1 + conv2) + 3 * fc)
    assert per_image == 28896
    assert step_flops(net, 2) == 2 * per_image


def test_roofline_flops_match_torch_flop_counter():
    model = TinyNet()
    x = torch.randn(2, 3, 4, 4)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert step_flops(conv_layers(model, (4, 4)), 2) == counter.get_total_flops()


def test_roofline_bytes_hand_count():
    net = conv_layers(TinyNet(), image_hw=(4, 4))
    n, e, p = 2, 4, 4                  # batch, fp32 activations, fp32 parameters
    # Per image elements: x (input), y (output); weights w. Forward reads x (+ the shortcut for the
    # unit's last conv), writes y, reads w. Backward reads dy and x, writes dx (not the stem), reads w
    # (not the stem), writes dw.
    stem = e * n * (48 + 64) + p * 108 + e * n * (64 + 48) + p * 108                   # x 3*4*4, y 4*4*4
    shortcut = e * n * (64 + 32) + p * 32 + e * n * (32 + 64 + 64) + 2 * p * 32        # y 8*2*2
    conv1 = e * n * (64 + 32) + p * 288 + e * n * (32 + 64 + 64) + 2 * p * 288
    conv2 = e * n * (32 + 32 + 32) + p * 576 + e * n * (32 + 32 + 32) + 2 * p * 576    # + shortcut read
    unit_grad_sum = e * n * 64         # the unit input's second gradient contribution, read once
    h, pooled, logits, fc = n * 8 * 4, n * 8, n * 10, 8 * 10 + 10
    head = (e * (h + 2 * pooled + logits) + p * fc                 # BN-ReLU-pool, linear forward
            + e * 2 * logits                                       # loss and its gradient
            + e * (logits + 2 * pooled) + p * (80 + fc)            # linear backward
            + e * (pooled + 2 * h))                                # BN-ReLU-pool backward
    params = 108 + 8 + 288 + 16 + 576 + 32 + 16 + 90               # convs, BN gamma+beta, fc
    optimizer = 5 * p * params
    assert params == net.params
    total = stem + shortcut + conv1 + conv2 + unit_grad_sum + head + optimizer
    assert total == 44680
    assert step_bytes(net, n, e) == total


def test_roofline_walks_resnet164():
    model = preact_fused.preact_resnet(164, fused=False)
    net = conv_layers(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(net.convs) == len(convs) == 1 + 54 * 3 + 2 + 1   # stem, 3 per unit, 3 projections
    assert [c.w_elems for c in net.convs if c.name == "stem"] == [16 * 3 * 9]
    assert sum(c.w_elems for c in net.convs) == sum(m.weight.numel() for m in convs)
    assert (net.head_channels, net.head_hw) == (256, 8 * 8)
    assert conv_layers(preact_fused.preact_resnet(164, fused=True)) == net


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 7, 64, 100, 1000, 1024])
@pytest.mark.parametrize("start", [1, 5, 128])
def test_largest_batch_exact(limit, start):
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= limit

    assert largest_batch(fits, cap=1024, start=start) == min(limit, 1024)
    assert len(calls) <= 2 * 11 + 2


def test_largest_batch_cap_and_resolution():
    assert largest_batch(lambda b: True, cap=300, start=128) == 300
    assert largest_batch(lambda b: b <= 1000, cap=4096, start=128, resolution=16) in range(985, 1001)
    assert largest_batch(lambda b: False, cap=64) == 0


def test_loss_check_flags_drift():
    def row(variant, dtype, *losses):
        return {"variant": variant, "dtype": dtype, "batch": 2, "losses": list(losses), "loss": losses[-1]}

    rows = [row("eager", "fp32", 2.3, 2.0),
            row("eager_cl", "fp32", 2.3, 2.0001),
            row("fused_reference", "fp32", 2.3, 2.1),
            row("eager_amp", "bf16", 2.3 * 1.04, 2.02),
            row("fused_amp", "bf16", 2.3, 2.15)]
    check_losses(rows)
    assert [r["drift"] for r in rows] == [False, False, True, False, False]
    assert rows[2]["loss_rtol"] == 1e-3
    assert rows[4]["loss_rtol"] == pytest.approx(2 * 0.04)     # twice the peer's worst step


def _write_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"tiny", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, n).tolist(), b"filenames": [b"x.png"] * n}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


def test_cifar_reader(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    written = [_write_batch(root / name, 3, i) for i, name in enumerate(TRAIN_FILES + TEST_FILES)]
    images, labels = load_cifar10(tmp_path, "train")         # the parent folder works too
    assert images.shape == (15, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == sum((b[b"labels"] for b in written[:5]), [])
    first = written[0][b"data"][0]
    assert torch.equal(images[0, 1].flatten(), torch.from_numpy(first[1024:2048]))   # green plane
    test_images, _ = load_cifar10(root, "test")
    assert test_images.shape == (3, 3, 32, 32)
    x = normalize(images)
    assert x.dtype == torch.float32 and x.shape == images.shape


def test_cifar_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    _write_batch(tmp_path / "test_batch", 2, 0)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_cifar10(tmp_path, "train")
    (tmp_path / "junk").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR"):
        read_batch(tmp_path / "junk")
    (tmp_path / "short").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="uint8"):
        read_batch(tmp_path / "short")


@pytest.fixture
def torch_settings():
    """The benchmark pins threads and precision switches for its process: restore them afterwards."""
    switches = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cudnn, "benchmark"),
                (torch.backends.cuda.matmul, "allow_tf32")]
    saved = [getattr(owner, name) for owner, name in switches]
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    yield
    for (owner, name), value in zip(switches, saved):
        setattr(owner, name, value)
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(precision)


def test_resnet_benchmark_cpu_smoke(tmp_path, capsys, torch_settings):
    status = main(["--device", "cpu", "--depth", "164", "--batch", "2", "--warmup", "1", "--steps", "1",
                   "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "resnet164.json").read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert {"eager", "eager_cl", "checkpoint", "fused_reference", "eager_amp", "fused_amp", "fused_amp_min"} <= set(rows)
    assert "compile_amp" in record["skipped"] and "SKIP compile_amp" in out
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["saved_bytes"] > 0 and row["tflops"] > 0
    assert rows["fused_reference"]["saved_bytes"] < rows["eager"]["saved_bytes"]
    assert rows["fused_amp_min"]["saved_bytes"] < rows["fused_amp"]["saved_bytes"]
    assert not rows["fused_amp_min"]["drift"]
    assert status == (1 if any(r.get("drift") for r in rows.values()) else 0)
    assert (tmp_path / "resnet164.csv").read_text().count("\n") == 1 + len(rows)
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("resnet164_variants.png", "resnet164_memory_vs_batch.png"):
            assert (tmp_path / name).stat().st_size > 0
    assert "fused_reference" in out and "img/s" in out


def test_ops_bench_shapes_and_cases():
    from benchmarks.ops_bench import make_case, triple_shapes

    shapes = triple_shapes(1001)
    assert len(shapes) == 16
    assert sum(count for _, count in shapes) == 333 * 3 + 3    # every unit's triples + 3 projections
    small = min((shape for shape, _ in shapes), key=lambda s: s.x_elems * s.cout)
    for provider in ("eager", "reference"):
        make_case(small, provider, 2, torch.device("cpu"))()


@pytest.mark.parametrize("name", ["stem", "s1.conv3", "s2.conv2.first", "s3.shortcut"])
def test_kernel_ops_times_every_closure_of_a_triple(name):
    """benchmarks.kernel_ops' closures call the six contracts correctly (here on the reference, CPU,
    a small batch and map): every op, the fused forward and backward, eager forward and backward."""
    from benchmarks.kernel_ops import OPS, RESNET1001_TRIPLES, Triple, measure

    _, cin, cout, _, k, stride = next(t for t in RESNET1001_TRIPLES if t[0] == name)
    triple = Triple(reference, name, cin, cout, 8, k, stride, 2, torch.float32, device="cpu")
    results = []
    row = measure(triple, lambda fn: results.append(fn()) or 1.0)
    assert set(row) == {f"{op}_ms" for op in OPS} | {"fused_fwd_ms", "fused_bwd_ms"}
    assert row["bn_backward_ms"] == (0.0 if name == "stem" else 1.0)
    y, partials = triple.fused_forward()
    assert y.shape == triple.dy.shape and (partials is not None) == triple.want_stats
    assert triple.eager_forward().shape == y.shape
    dx, dw, *bn_grads = triple.eager_backward_closure()()
    assert dx.shape == triple.x.shape and dw.shape == triple.weight.shape and len(bn_grads) == 2 * triple.with_bn
    fwd_bytes, bwd_bytes = triple.min_bytes()
    assert fwd_bytes > 0 and bwd_bytes > fwd_bytes / 2
