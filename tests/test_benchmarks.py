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

    rows = [row("eager", "fp32", 2.3, 2.0, 1.5),
            row("eager_cl", "fp32", 2.3 * (1 + 5e-5), 2.0001, 1.5),
            row("fused_reference", "fp32", 2.3 * 1.01, 2.0, 1.5),
            row("eager_amp", "bf16", 2.3 * 1.04, 2.02, 1.5),
            row("fused_amp", "bf16", 2.3 * 1.1, 2.0, 1.5),
            row("fused_amp_min", "bf16", 2.3, 2.2, 1.8)]   # strays only after the flagged step
    check_losses(rows)
    assert [r["drift"] for r in rows] == [False, False, True, False, True, False]
    assert rows[2]["loss_rtol"] == pytest.approx(2e-4)     # the fp32 floor (the peer strays 5e-5)
    assert rows[4]["loss_rtol"] == pytest.approx(2 * 0.04)     # twice the peer's distance at step 0
    assert rows[5]["loss_rdiff"] == pytest.approx(0.2)      # reported, not flagged


def test_loss_check_bf16_bound_is_relative_to_eager_amp():
    """A bf16 fused run 34x further from eager than eager_amp is flagged; the floor is small."""
    def row(variant, dtype, *losses, **extra):
        return {"variant": variant, "dtype": dtype, "batch": 2, "losses": list(losses), "loss": losses[-1], **extra}

    rows = [row("eager", "fp32", 2.0), row("eager_amp", "bf16", 2.0 * (1 + 5.6e-4)),
            row("fused_amp", "bf16", 2.0 * (1 + 1.9e-2)), row("fused_amp_min", "bf16", 2.0 * (1 + 1e-3)),
            row("fused_amp_min_graphed", "bf16", 2.0 * (1 + 1e-3) * (1 + 1e-6), graphed=True),
            row("eager_amp_graphed", "bf16", 2.0 * (1 + 3e-2), graphed=True)]
    check_losses(rows)
    by = {r["variant"]: r for r in rows}
    assert by["fused_amp"]["drift"] and by["fused_amp"]["loss_rtol"] == pytest.approx(2e-3)
    assert not by["fused_amp_min"]["drift"]
    assert not by["fused_amp_min_graphed"]["drift"] and by["fused_amp_min_graphed"]["graph_rdiff"] < 1e-5
    assert by["eager_amp_graphed"]["graph_mismatch"] and by["eager_amp_graphed"]["drift"]


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
                   "--threads", "1", "--count-kernels", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "resnet164.json").read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert {"eager", "eager_cl", "checkpoint", "fused_reference", "eager_amp", "fused_amp", "fused_amp_min"} <= set(rows)
    assert "compile_amp" in record["skipped"] and "SKIP compile_amp" in out
    for name in ("eager_graphed", "fused_amp_graphed", "fused_amp_min_graphed", "compile_amp_reduce_overhead"):
        assert name in record["skipped"] and name not in rows
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["saved_bytes"] > 0 and row["tflops"] > 0
        assert row["kernels_per_step"] is None  # the CUDA profiler's count: GPU only
    assert rows["fused_reference"]["saved_bytes"] < rows["eager"]["saved_bytes"]
    assert rows["fused_amp_min"]["saved_bytes"] < rows["fused_amp"]["saved_bytes"]
    # memory="min" recomputes the same arithmetic: the same losses as fused_amp, so the same verdict
    assert rows["fused_amp_min"]["losses"] == rows["fused_amp"]["losses"]
    assert rows["fused_amp_min"]["drift"] == rows["fused_amp"]["drift"]
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
    """benchmarks.kernel_ops' closures call the contract ops correctly (here on the reference, CPU,
    a small batch and map): every op, the fused forward and backward, eager forward and backward."""
    from benchmarks.kernel_ops import OPS, Triple, measure
    from preact_fused.shapes import RESNET1001_TRIPLES

    _, cin, cout, _, k, stride = next(t for t in RESNET1001_TRIPLES if t[0] == name)
    triple = Triple(reference, name, cin, cout, 8, k, stride, 2, torch.float32, device="cpu")
    results = []
    row = measure(triple, lambda fn: results.append(fn()) or 1.0)
    assert set(row) == {f"{op}_ms" for op in OPS} | {"fused_fwd_ms", "fused_bwd_ms"}
    assert row["bn_backward_ms"] == (0.0 if name == "stem" else 1.0)
    y, stats, fold = triple.fused_forward()
    assert y.shape == triple.dy.shape and (stats is not None) == triple.want_stats
    assert (fold is not None) == triple.with_bn
    assert triple.eager_forward().shape == y.shape
    dx, dw, *bn_grads = triple.eager_backward_closure()()
    assert dx.shape == triple.x.shape and dw.shape == triple.weight.shape and len(bn_grads) == 2 * triple.with_bn
    fwd_bytes, bwd_bytes = triple.min_bytes()
    assert fwd_bytes > 0 and bwd_bytes > fwd_bytes / 2


def test_default_results_go_to_an_ignored_folder(tmp_path):
    from benchmarks import COMMITTED, LOCAL, output_dir
    from benchmarks.resnet1001 import parse_args

    cpu = torch.device("cpu")
    assert output_dir(None, False, cpu) == LOCAL / "cpu"
    assert output_dir(None, True, cpu) == COMMITTED / "cpu"
    assert output_dir(tmp_path, True, cpu) == tmp_path
    assert parse_args(["--commit-results"], gpu=False).commit_results
    assert parse_args(["--warmup", "5"], gpu=False).graph_warmup == 3
    assert parse_args(["--warmup", "1"], gpu=False).graph_warmup == 1
    ignored = (COMMITTED.parents[1] / ".gitignore").read_text().split()
    assert "benchmarks/results/local/" in ignored and "benchmarks/wheels/" in ignored


def test_rows_of_a_backend_that_failed_the_smoke_are_invalid(tmp_path):
    from benchmarks import mark_invalid, smoke_failures

    path = tmp_path / "smoke.json"
    path.write_text(json.dumps({"complete": True, "backends": {"cuda": {"ok": True}, "triton": {"ok": False,
                                                                                             "summary": "dx off"}}}))
    rows = [{"backend": "cuda"}, {"backend": "triton"}, {"backend": "eager"}]
    mark_invalid(rows, smoke_failures(str(path)))
    assert [bool(r.get("invalid")) for r in rows] == [False, True, False] and "dx off" in rows[1]["invalid"]
    path.write_text(json.dumps({"complete": False, "backends": {"cuda": {"ok": True}}}))
    assert set(smoke_failures(str(path))) == {"triton"}          # never reached: not vouched for
    assert set(smoke_failures(str(tmp_path / "missing.json"))) >= {"triton", "cuda"}
    assert smoke_failures("") is None


def test_smoke_checks_pass_for_the_reference_itself():
    from benchmarks.smoke import check
    from preact_fused.shapes import RESNET1001_TRIPLES

    triple = next(t for t in RESNET1001_TRIPLES if t[0] == "s2.conv3")
    assert check(reference, (triple[0], *triple[1:3], 8, *triple[4:]), 2, torch.float32, torch.device("cpu")) == []


def test_sweep_powers_and_headline():
    from benchmarks.batch_sweep import headline, powers

    assert powers(128, 1000) == [128, 256, 512]
    rows = [{"variant": "eager_amp", "batch": 128, "images_per_s": 100.0}, {"variant": "eager_amp", "batch": 700,
            "max_batch": 700}, {"variant": "eager_amp", "batch": 700, "images_per_s": 110.0},
            {"variant": "fused_amp", "batch": 700, "images_per_s": 220.0, "headline": True},
            {"variant": "fused_amp", "batch": 1500, "max_batch": 1500}]
    head = headline(rows, "eager_amp", 700)
    assert head["variants"]["fused_amp"] == {"images_per_s": 220.0, "peak_alloc_bytes": None, "max_batch": 1500,
                                             "vs_reference": 2.0}
    assert head["variants"]["eager_amp"]["max_batch"] == 700


def test_sweep_refuses_a_cpu(capsys):
    from benchmarks.batch_sweep import main as sweep_main

    assert sweep_main(["--device", "cpu"]) == 2


def test_readme_table_from_a_fixture(tmp_path):
    from benchmarks.readme_table import BEGIN, END, gpu_section, render

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\nrest\n")
    (tmp_path / "cpu").mkdir()
    assert "No GPU figures" in gpu_section(tmp_path)
    gpu = tmp_path / "nvidia-h200"
    gpu.mkdir()
    env = {"device_name": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "date": "d"}
    base = {"backend": "cuda", "dtype": "bf16", "batch": 128, "peak_alloc_bytes": 2**30, "loss_rdiff": 1e-3}
    (gpu / "resnet1001.json").write_text(json.dumps({"environment": env, "rows": [
        {**base, "variant": "fused_amp", "images_per_s": 900.0},
        {**base, "variant": "fused_amp_graphed", "graphed": True, "images_per_s": 1200.0},
        {**base, "variant": "fused_triton", "backend": "triton", "images_per_s": 5.0, "invalid": "backend triton failed"}]}))
    (gpu / "sweep.json").write_text(json.dumps({"environment": env, "headline": {"reference": "eager_amp", "batch": 1000,
        "variants": {"eager_amp": {"images_per_s": 500.0, "vs_reference": 1.0, "max_batch": 1000}}}}))
    row = {"backend": "cudnn", "count": 1, "fused_fwd_ms": 1.0, "fused_bwd_ms": 2.0, "eager_fwd_ms": 2.0,
           "eager_bwd_ms": 4.0, "min_bytes_ms": 1.0, "triple": "s1.conv2"}
    (gpu / "kernel_ops.json").write_text(json.dumps({"rows": [row, {"backend": "cudnn", "triple": "stem", "count": 1,
                                                                  "unsupported": "fwd: check_support"}]}))
    section = gpu_section(tmp_path)
    text = render(readme.read_text(), section)
    assert text.startswith("intro\n") and text.endswith(f"{END}\nrest\n") and "old" not in text
    assert "| fused_amp_graphed | cuda | bf16 | yes | 128 | 1200 | 1,024 | - |" in section
    assert "fused_triton" not in section.split("rows left out")[0] and "1 rows left out" in section
    assert "| eager_amp | 500 | 1.00x | 1000 |" in section
    assert "could not build 1 triple" in section and "NVIDIA H200" in section
    assert render(text, section) == text


def test_readme_cpu_sections_from_a_fixture(tmp_path):
    """The CPU records' sections name the command and machine of the record, or say none exists."""
    from benchmarks.readme_table import host_overhead_section, launches_section

    assert "Not measured yet" in launches_section(tmp_path)
    (tmp_path / "cpu").mkdir()
    env = {"device_name": "Some CPU", "cpu_count": 2, "torch": "2.14", "triton": "3.8", "date": "d"}
    row = {"backend": "eager", "reason": None, "unit_step_s": 4e-4, "unit_forward_s": 1e-4, "unit_backward_s": 3e-4,
           **{f"resnet1001_{w}_s": {"median": v, "q20": v, "q80": v} for w, v in
              (("step", 0.16), ("forward", 0.06), ("backward", 0.1))}}
    (tmp_path / "cpu" / "host_overhead.json").write_text(json.dumps(
        {"command": "python -m benchmarks.host_overhead --device cpu", "environment": env,
         "rows": [row, {"backend": "triton", "reason": "no triton"}]}))
    section = host_overhead_section(tmp_path)
    assert section.startswith("`python -m benchmarks.host_overhead --device cpu` on Some CPU (2 cores;")
    assert "| eager | 160.0 |" in section and "| 400 | 1.00x |" in section and "cannot run: no triton" in section


def test_readme_table_is_current():
    from benchmarks.readme_table import main as table_main

    assert table_main(["--check"]) == 0, "run python -m benchmarks.readme_table"


class _FakeNode:
    def __init__(self, log, op):
        self.log, self.op = log, op

    def set_output(self, flag):
        return self

    def set_dim(self, dim):
        return self

    def set_stride(self, stride):
        return self

    def set_data_type(self, dtype):
        return self


class _FakeGraph:
    def __init__(self, log, refuse):
        self.log, self.refuse, self.ops = log, refuse, []

    def __getattr__(self, op):
        def node(*args, **kwargs):
            self.ops.append(op)
            return (_FakeNode(self.log, op), _FakeNode(self.log, op)) if op == "genstats" else _FakeNode(self.log, op)
        return node

    def check_support(self):
        if any(op in self.refuse for op in self.ops):
            raise RuntimeError("not supported: " + "+".join(self.ops))
        self.log.append(tuple(self.ops))

    def validate(self):
        pass

    build_operation_graph = build_plans = validate

    def create_execution_plans(self, modes):
        pass

    def get_workspace_size(self):
        return 0


class _FakeCudnn:
    """Stands in for ``import cudnn``: records each built graph's nodes; refuses graphs with given ops."""

    class data_type:
        HALF, FLOAT = "half", "float"

    class heur_mode:
        A, FALLBACK = "a", "fallback"

    class reduction_mode:
        ADD = "add"

    def __init__(self, refuse=()):
        self.log, self.refuse = [], set(refuse)

    def pygraph(self, **kwargs):
        return _FakeGraph(self.log, self.refuse)

    def create_handle(self):
        return object()


@pytest.mark.parametrize("refuse", [(), ("reduction",), ("conv_fprop",)])
def test_cudnn_peer_builds_the_fused_patterns(refuse):
    from benchmarks.cudnn_peer import CudnnTriple

    fake = _FakeCudnn(refuse)
    peer = CudnnTriple("s1.conv3", 16, 64, 8, 1, 1, 2, cudnn=fake, device="cpu")
    fwd = next(ops for ops in fake.log if "conv_fprop" in ops) if "conv_fprop" not in refuse else None
    if fwd is not None:
        assert [op for op in fwd if op != "tensor"] == ["scale", "bias", "relu", "conv_fprop", "add", "genstats"]
    assert ("reduction" in peer.patterns["dgrad"]) is False or not refuse
    if "reduction" in refuse:
        assert peer.patterns["dgrad"] == "dgrad_drelu (sums by torch)" and "dgrad" not in peer.reasons
    if "conv_fprop" in refuse:
        assert "fwd" in peer.runnable() and "check_support" in peer.reasons["fwd"]
    else:
        assert peer.runnable() is None
    assert any("conv_wgrad" in ops and "relu" in ops for ops in fake.log)
    stem = CudnnTriple("stem", 3, 16, 8, 3, 1, 2, cudnn=fake, device="cpu")
    assert stem.patterns.get("fwd", "conv_genstats") == "conv_genstats" and "dx" not in stem.patterns


def test_cudnn_peer_unavailable_reason_names_the_fix():
    from benchmarks.cudnn_peer import unavailable_reason

    reason = unavailable_reason()
    assert reason is None or "download_wheels.sh" in reason or "GPU" in reason


def test_smoke_compares_every_contract_output_on_cpu():
    """benchmarks.smoke calls every contract op correctly: on the reference in float32 (CPU, a small
    map) no output is out of bounds, and a broken op is caught."""
    from benchmarks import smoke
    from preact_fused.shapes import RESNET1001_TRIPLES

    for name in ("s1.conv3", "s2.conv2.first"):
        _, cin, cout, _, k, stride = next(t for t in RESNET1001_TRIPLES if t[0] == name)
        assert smoke.check(reference, (name, cin, cout, 8, k, stride), 2, torch.float32, "cpu") == []

    class Broken:
        def __getattr__(self, op):
            return getattr(reference, op)

        @staticmethod
        def conv_wgrad(*args):
            return reference.conv_wgrad(*args) * 1.01

    failures = smoke.check(Broken(), ("s1.conv2", 16, 16, 8, 3, 1), 2, torch.float32, "cpu")
    assert [f["output"] for f in failures] == ["conv_wgrad.dw"]
