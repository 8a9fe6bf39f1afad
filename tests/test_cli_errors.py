"""The training CLI's answers to bad arguments, bad checkpoints and a diverging run.

Bad arguments and checkpoints: exit status 2 and one ``error:`` line naming the problem, no
traceback. A NaN or infinite training loss: the run stops with a clear message and status 1,
having written nothing after the loss went bad (the last checkpoint and the log are kept).
"""
import subprocess
import sys

import pytest
import torch

from preact_fused import train

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 steps per epoch of a depth-8 net on 16 synthetic images.
TINY = ["--synthetic", "--device", "cpu", "--depth", "8", "--block", "basic", "--train-subset", "16",
        "--test-subset", "8", "--batch-size", "8", "--epochs", "2", "--warmup-steps", "0", "--no-progress",
        "--no-plot", "--threads", "1"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{train.PROG}: error: "), err
    return line


@pytest.mark.parametrize("argv, message", [
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--device", "meta"], "training runs on cpu or cuda"),
    (["--train-subset", "-5"], "--train-subset must be at least 0, got -5"),
    (["--test-subset", "-1"], "--test-subset must be at least 0"),
    (["--num-classes", "0"], "--num-classes must be at least 2, got 0"),
    (["--num-classes", "1"], "--num-classes must be at least 2"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
    (["--save-every", "-3"], "--save-every must be at least 0"),
    (["--stop-after", "-1"], "--stop-after must be at least 0"),
    (["--threads", "-2"], "--threads must be at least 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["--momentum", "nan"], "--momentum must be a finite number >= 0"),
    (["--weight-decay=-1e-4"], "--weight-decay must be a finite number >= 0"),
    (["--warmup-lr", "inf"], "--warmup-lr must be a finite number >= 0"),
    (["--memory-budget", "0"], "--memory-budget must be a finite number > 0"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--out", str(tmp_path)] + argv)
    assert exit_info.value.code == 2
    assert message in _error_line(capsys)
    assert not any(tmp_path.iterdir()), "a refused run wrote files"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_a_gpu(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--out", str(tmp_path), "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in _error_line(capsys)


def test_bad_argument_from_the_command_line(tmp_path):
    """The real process: status 2, argparse's usage and one error line, no traceback."""
    out = subprocess.run([sys.executable, "-m", "preact_fused.train", *TINY, "--out", str(tmp_path),
                          "--device", "bogus"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"{train.PROG}: error: --device 'bogus' is not a device: "
                                                   "give auto, cpu, cuda or cuda:N")


def _bad_checkpoints(folder):
    """(name, path, expected message part) of files that are not resumable checkpoints."""
    good = folder / "good" / "checkpoint.pt"
    assert train.main(TINY + ["--out", str(good.parent), "--stop-after", "1"]) == 0
    raw = good.read_bytes()
    files = {"empty": b"", "truncated": raw[:len(raw) // 2], "text": b"not a checkpoint\n"}
    cases = []
    for name, content in files.items():
        path = folder / f"{name}.pt"
        path.write_bytes(content)
        cases.append((name, path, "is not a readable checkpoint"))
    foreign = {"weights": {"w": torch.zeros(2)}, "tensor": torch.zeros(3),
               "other_format": {**torch.load(good, weights_only=True), "format": 7}}
    for name, obj in foreign.items():
        path = folder / f"{name}.pt"
        torch.save(obj, path)
        cases.append((name, path, f"is not a checkpoint of {train.PROG}"))
    return cases


def test_unresumable_checkpoints_exit_2_with_one_line(capsys, tmp_path):
    cases = _bad_checkpoints(tmp_path)
    capsys.readouterr()
    for name, path, message in cases:
        assert train.main(TINY + ["--out", str(tmp_path / "run"), "--resume", str(path)]) == 2, name
        line = _error_line(capsys)
        assert str(path) in line and message in line, (name, line)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_checkpoint_of_another_model_exits_2(capsys, tmp_path):
    assert train.main(TINY + ["--out", str(tmp_path), "--stop-after", "1"]) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    wider = [a if a != "8" else "14" for a in TINY]  # depth 14: more units than the checkpoint holds
    with pytest.warns(RuntimeWarning, match="different settings"):
        assert train.main(wider + ["--out", str(tmp_path), "--resume"]) == 2
    line = _error_line(capsys)
    assert "holds another model or optimizer (depth 8, block basic; this run: depth 14, block basic)" in line
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_missing_checkpoint_exits_2(capsys, tmp_path):
    assert train.main(TINY + ["--out", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint to resume at" in _error_line(capsys)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(capsys, tmp_path):
    """lr 1e30: the first step's loss is finite (checkpointed by --save-every 1), the second is NaN."""
    assert train.main(TINY + ["--out", str(tmp_path), "--lr", "1e30", "--save-every", "1"]) == 1
    line = _error_line(capsys)
    assert "the training loss became nan by epoch 1, step 2" in line and "stopped" in line
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 1 and torch.isfinite(state["meters"]).all()
    assert (tmp_path / "log.csv").read_text().count("\n") == 1, "a log row was written after the NaN"


def test_nan_loss_after_resume_leaves_checkpoint_and_log_untouched(capsys, tmp_path, monkeypatch):
    """A resumed run whose next batch is NaN stops before the end of the epoch writes anything."""
    plain = TINY + ["--out", str(tmp_path), "--no-fused"]
    assert train.main(plain + ["--stop-after", "3"]) == 0  # epoch 1 logged; stopped at epoch 2, step 1
    checkpoint, log = (tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "log.csv").read_text()
    capsys.readouterr()
    batch = train.Trainer.batch
    monkeypatch.setattr(train.Trainer, "batch", lambda self, plan, step: (
        lambda x, target: (x * float("nan"), target))(*batch(self, plan, step)))
    assert train.main(plain + ["--resume"]) == 1
    assert "the training loss became nan by epoch 2, step 2" in _error_line(capsys)
    assert (tmp_path / "checkpoint.pt").read_bytes() == checkpoint
    assert (tmp_path / "log.csv").read_text() == log
