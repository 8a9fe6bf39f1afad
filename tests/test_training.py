"""The training path: CIFAR pickle batches, augmentation, the paper's schedule, exact resume, the CLI."""
import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preact_fused import data, train


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(root, dataset="cifar10", n_train=24, n_test=8, seed=0):
    classes = data.DATASETS[dataset].num_classes
    train_set = data.synthetic(n_train, classes, seed=seed)
    test_set = data.synthetic(n_test, classes, seed=seed + 1)
    return data.write_batches(root, train_set, test_set, dataset), train_set, test_set


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_batches_round_trip(tmp_path, dataset):
    folder, (x, y), (xt, yt) = _write(tmp_path, dataset)
    assert folder.name == data.DATASETS[dataset].subdir
    for root in (tmp_path, folder):  # the parent or the batch folder itself
        images, labels, name = data.load_cifar(root, "train")
        assert name == dataset and torch.equal(images, x) and torch.equal(labels, y)
        images, labels, _ = data.load_cifar(root, "test", dataset)
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32) and torch.equal(labels, yt)
    if dataset == "cifar10":
        assert torch.equal(data.load_cifar10(tmp_path, "test")[0], xt)


def test_bad_data_directories_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_cifar(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no CIFAR python batches"):
        data.load_cifar(tmp_path / "empty")
    folder, _, _ = _write(tmp_path / "c10")
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_cifar(folder, "train")
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR python batch"):
        data.load_cifar(folder, "train")
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": b"\0" * 3072, b"labels": [0]}, f)
    with pytest.raises(ValueError, match="not arrays|uint8"):
        data.load_cifar(folder, "train")
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": torch.zeros(2, 3072, dtype=torch.uint8).numpy(), b"labels": [0, 10]}, f)
    with pytest.raises(ValueError, match="0..9"):
        data.load_cifar(folder, "test")


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_batch_files_cannot_run_code(tmp_path):
    folder, _, _ = _write(tmp_path)
    marker = tmp_path / "ran"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _RunsCode(str(marker)), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        data.load_cifar(folder, "test")
    assert not marker.exists()


def test_augment_is_pad_crop_flip():
    images = data.synthetic(6, seed=3)[0]
    offsets, flips = data.augmentation_plan(6, torch.Generator().manual_seed(0))
    flips[:2] = torch.tensor([True, False])
    out = data.augment(images, offsets, flips)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(6):
        r, c = offsets[i].tolist()
        crop = padded[i, :, r:r + 32, c:c + 32]
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop)
    assert offsets.min() >= 0 and offsets.max() <= 8


def test_paper_schedule():
    sched = train.PaperSchedule(total_steps=1000, warmup_steps=400, warmup_factor=0.1, milestones=[0.5, 0.75])
    assert [sched(s) for s in (0, 399, 400, 499)] == [0.1, 0.1, 1, 1]
    assert sched(500) == pytest.approx(0.1) and sched(749) == pytest.approx(0.1)
    assert sched(750) == pytest.approx(0.01) and sched(999) == pytest.approx(0.01)
    args = train.build_parser().parse_args(["--synthetic", "--depth", "1001"])
    train.check_args(args, train.build_parser())
    assert (args.epochs, args.batch_size, args.lr, args.momentum, args.weight_decay) == (164, 128, 0.1, 0.9, 1e-4)
    assert (args.warmup_steps, args.warmup_lr, args.milestones) == (400, 0.01, [0.5, 0.75])
    args = train.build_parser().parse_args(["--synthetic", "--depth", "20", "--block", "basic"])
    train.check_args(args, train.build_parser())
    assert args.warmup_steps == 0


TINY = ["--synthetic", "--device", "cpu", "--depth", "8", "--block", "basic", "--train-subset", "24",
        "--test-subset", "8", "--batch-size", "8", "--epochs", "2", "--warmup-steps", "2", "--no-progress",
        "--no-plot", "--amp", "fp16", "--memory", "min", "--threads", "1"]


def _rows(out: Path):
    with open(out / "log.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")}
                for r in csv.DictReader(f)]


def test_resume_continues_bit_for_bit(tmp_path):
    """6 steps in one go == 2 steps, resume, 2 steps (across the epoch end), resume, 2 steps."""
    assert train.main(TINY + ["--out", str(tmp_path / "a")]) == 0
    b = str(tmp_path / "b")
    assert train.main(TINY + ["--out", b, "--stop-after", "2"]) == 0
    assert train.main(TINY + ["--out", b, "--stop-after", "2", "--resume"]) == 0
    assert train.main(TINY + ["--out", b, "--resume", str(Path(b) / "checkpoint.pt")]) == 0
    full = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(Path(b) / "checkpoint.pt", weights_only=True)
    assert (full["epoch"], full["step"], full["global_step"]) == (resumed["epoch"], resumed["step"],
                                                                  resumed["global_step"]) == (2, 0, 6)
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in full["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])
    assert full["scheduler"] == resumed["scheduler"] and full["scaler"] == resumed["scaler"]
    assert _rows(tmp_path / "a") == _rows(Path(b)) and len(_rows(Path(b))) == 2


def test_cli_trains_one_epoch_on_a_cifar_directory(tmp_path):
    _write(tmp_path / "cifar", n_train=20, n_test=6)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PREACT_FUSED_BACKEND="reference")
    result = subprocess.run(
        [sys.executable, "-m", "preact_fused.train", "--data", str(tmp_path / "cifar"), "--depth", "8",
         "--block", "basic", "--epochs", "1", "--batch-size", "8", "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1" in result.stdout and "cifar10" in result.stdout
    rows = list(csv.DictReader(open(out / "log.csv", newline="")))
    assert len(rows) == 1 and rows[0]["epoch"] == "1" and rows[0]["step"] == "2"  # 20 images: 2 batches of 8
    assert 0 <= float(rows[0]["test_error"]) <= 1
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and "model" in state and "rng" in state


def test_cli_reports_bad_data(tmp_path, capsys):
    assert train.main(["--data", str(tmp_path / "missing"), "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    folder, _, _ = _write(tmp_path / "c")
    (folder / "data_batch_1").write_bytes(b"\x80\x02garbage")
    assert train.main(["--data", str(folder), "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "data_batch_1 is not a CIFAR python batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--device", "cpu"])  # neither --data nor --synthetic
    assert "--synthetic" in capsys.readouterr().err


def test_measure_memory_table(capsys):
    assert train.main(["--measure-memory", "--depth", "8", "--block", "basic", "--device", "cpu",
                       "--memory-budget", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(line.split()[:-3]): float(line.split()[-3]) for line in lines[2:]}
    assert len(rows) == 8
    fused = {k[-2:]: v for k, v in rows.items() if k[0] == "fused"}
    assert fused["fp32", "min"] < fused["fp32", "activations"]
    assert fused["bf16", "activations"] == pytest.approx(fused["fp32", "activations"] / 2, rel=0.05)
    assert rows["fused", "fp32", "activations"] < rows["plain", "PyTorch", "fp32", "activations"]


def test_largest_batch_search():
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= 1000

    assert train.largest_batch(fits, start=64, resolution=8) in range(993, 1001)
    assert len(calls) < 15
    assert train.largest_batch(lambda b: False) == 0
