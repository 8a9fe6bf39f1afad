"""Train a pre-activation ResNet on CIFAR-10/100: ``python -m preact_fused.train``.

The defaults are the recipe of He et al. (2016), "Identity Mappings in Deep Residual Networks":
SGD with momentum 0.9 and weight decay 1e-4, batch 128, learning rate 0.1 (0.01 for the first 400
iterations of nets of depth 110 and more), divided by 10 at 50% and 75% of training, 164 epochs;
4-pixel zero padding + random 32x32 crop + random horizontal flip; per-channel standardisation.

One GPU::

    python -m preact_fused.train --data ~/data/cifar-10-batches-py --depth 1001 --amp bf16

Several GPUs (one process per GPU; ``--batch-size`` is the global batch, split over the ranks; the
BatchNorm statistics are those of the global batch, as on one GPU)::

    torchrun --standalone --nproc-per-node 4 -m preact_fused.train --data ~/data/cifar-10-batches-py --depth 1001

CPU (a quick look; the reference backend)::

    python -m preact_fused.train --synthetic --device cpu --depth 20 --block basic --epochs 1 --train-subset 2048

Every epoch writes ``OUT/log.csv`` (losses, errors, learning rate, time, throughput, peak memory),
``OUT/curves.png`` and ``OUT/checkpoint.pt``; ``--resume`` continues from the checkpoint exactly where
it stopped (same weights, optimizer and scheduler state, data order and augmentation, random-number
state), mid-epoch included. ``--stop-after N`` ends a run after N steps with a checkpoint (for
time-limited job slots). ``--measure-memory`` prints the activation memory per image of each mode.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import backend as _backend
from . import data as _data
from . import distributed as _dist
from .graphs import GraphedStep, graph_unsupported_reason
from .memory import count_saved_bytes
from .models import preact_resnet
from .nn import MEMORY_MODES
from .runs import Progress, largest_batch

CSV_FIELDS = ("epoch", "step", "lr", "train_loss", "train_error", "test_loss", "test_error", "epoch_seconds",
              "images_per_second", "peak_memory_gib")
PROG = "python -m preact_fused.train"
CHECKPOINT_KEYS = ("format", "model", "optimizer", "scheduler", "scaler", "epoch", "step", "global_step", "meters",
                   "rng", "args")


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="folder of the CIFAR python batches (cifar-10-batches-py, "
                   "cifar-100-python) or its parent; never downloaded")
    g.add_argument("--dataset", choices=("auto", *_data.DATASETS), default="auto", help="which CIFAR")
    g.add_argument("--synthetic", action="store_true", help="random images and labels instead of --data")
    g.add_argument("--num-classes", type=int, default=10, help="classes of the --synthetic data")
    g.add_argument("--train-subset", type=int, default=0, metavar="N", help="first N training images only (0: all)")
    g.add_argument("--test-subset", type=int, default=0, metavar="N", help="first N test images only (0: all)")

    g = parser.add_argument_group("model")
    g.add_argument("--depth", type=int, default=164, help="110, 164, 1001; any 6n+2 / 9n+2 with --block")
    g.add_argument("--block", choices=("basic", "bottleneck"), default=None,
                   help="unit type (default: the paper's for 110/164/1001)")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="fused BN-ReLU-conv ops (--no-fused: plain PyTorch modules, same weights)")
    g.add_argument("--backend", choices=("auto", *_backend.BACKENDS), default="auto", help="fused-op backend")
    g.add_argument("--memory", choices=MEMORY_MODES, default="activations",
                   help="activations: one saved map per BN-ReLU-conv; min: recompute each unit in backward")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations (default: on CUDA)")

    g = parser.add_argument_group("optimisation (defaults: the paper's recipe)")
    g.add_argument("--epochs", type=int, default=164)
    g.add_argument("--batch-size", type=int, default=128, help="global batch (split over the ranks)")
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="steps at --warmup-lr first (default: 400 for depth >= 110, else 0)")
    g.add_argument("--warmup-lr", type=float, default=0.01)
    g.add_argument("--milestones", type=float, nargs="*", default=[0.5, 0.75],
                   help="fractions of training where the learning rate is divided by 10")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast dtype (fp16 adds a GradScaler); statistics and weights stay fp32")
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    g.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm statistics over all ranks (default: on with several ranks)")
    g.add_argument("--dist-backend", default=None, help="process-group backend (default: nccl on CUDA, gloo on CPU)")
    g.add_argument("--out", metavar="DIR", default=None, help="log, plot and checkpoint folder "
                   "(default: runs/preact_resnet<depth>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: OUT/checkpoint.pt)")
    g.add_argument("--save-every", type=int, default=0, metavar="STEPS", help="also checkpoint every STEPS steps")
    g.add_argument("--stop-after", type=int, default=0, metavar="STEPS",
                   help="end this run after STEPS steps, with a checkpoint (0: train to the end)")
    g.add_argument("--eval-batch-size", type=int, default=500)
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="capture each training step (forward, backward, SGD) as one CUDA graph after 3 "
                   "eager steps and replay it (one GPU, --amp none or bf16; recaptured when the "
                   "learning rate changes)")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="OUT/curves.png")

    g = parser.add_argument_group("memory figures (print and exit)")
    g.add_argument("--measure-memory", action="store_true",
                   help="activation bytes per image (saved-tensor hooks) of the fused and plain nets, "
                   "fp32 and bf16, both memory modes, and the largest batch that fits --memory-budget")
    g.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="device memory for the largest-batch estimate (default: the CUDA device's, or 80)")
    g.add_argument("--probe-max-batch", action="store_true",
                   help="with --measure-memory on CUDA: find the largest batch by running training steps")
    return parser


def check_args(args, parser) -> None:
    if not args.measure_memory and not args.synthetic and not args.data:
        parser.error("give --data DIR (the CIFAR python batches) or --synthetic")
    if args.synthetic and args.data:
        parser.error("--synthetic and --data exclude each other")
    minimums = {"epochs": 1, "batch_size": 1, "eval_batch_size": 1, "num_classes": 2, "train_subset": 0,
                "test_subset": 0, "warmup_steps": 0, "threads": 0, "save_every": 0, "stop_after": 0}
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    positive = {"lr": True, "momentum": False, "weight_decay": False, "warmup_lr": False, "memory_budget": True}
    for name, strictly in positive.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and (value > 0 if strictly else value >= 0)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number {'>' if strictly else '>='} 0, "
                         f"got {value}")
    check_device(args.device, parser)
    if args.warmup_steps is None:
        args.warmup_steps = 400 if args.depth >= 110 else 0
    if any(not 0 < m < 1 for m in args.milestones):
        parser.error("--milestones are fractions of training, between 0 and 1")
    if args.out is None:
        args.out = f"runs/preact_resnet{args.depth}"


def check_device(name: str, parser) -> None:
    """parser.error unless ``name`` is auto, cpu or a CUDA device torch can see."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is not a device: give auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name!r}: training runs on cpu or cuda")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            parser.error(f"--device {name}: torch sees no CUDA device")
        if device.index is not None and device.index >= count:
            parser.error(f"--device {name}: torch sees {count} CUDA device(s)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, not written by this trainer, or of another model."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run stops before writing anything more."""


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_checkpoint(path) -> dict:
    """The state saved by ``Trainer.save`` at ``path``; CheckpointError if unreadable or foreign."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any failure of the unpickler means an unreadable file)
        raise CheckpointError(f"{path} is not a readable checkpoint ({_one_line(err)})") from err
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing or state["format"] != 1 or not isinstance(state["args"], dict):
        raise CheckpointError(f"{path} is not a checkpoint of {PROG}"
                              + (f" (missing {', '.join(missing)})" if missing else " (unknown format)"))
    return state


# ----------------------------------------------------------------------------------------------------
# Data


class Dataset:
    """CIFAR images kept as uint8 on the training device; labels int64; normalisation constants."""

    def __init__(self, train, test, num_classes: int, name: str, device: torch.device):
        self.train_images, self.train_labels = (t.to(device) for t in train)
        self.test_images, self.test_labels = (t.to(device) for t in test)
        self.num_classes, self.name = num_classes, name
        layout = _data.DATASETS["cifar100" if name == "cifar100" else "cifar10"]
        self.mean, self.std = layout.mean, layout.std


def load_dataset(args, device: torch.device) -> Dataset:
    """The training and test sets named by the arguments (FileNotFoundError / ValueError if unreadable)."""
    if args.synthetic:
        n_train, n_test = args.train_subset or 50000, args.test_subset or 10000
        train = _data.synthetic(n_train, args.num_classes, seed=args.seed + 1)
        test = _data.synthetic(n_test, args.num_classes, seed=args.seed + 2)
        return Dataset(train, test, args.num_classes, "synthetic", device)
    *train, name = _data.load_cifar(args.data, "train", args.dataset)
    test = _data.load_cifar(args.data, "test", name)[:2]
    if args.train_subset:
        train = [t[:args.train_subset] for t in train]
    if args.test_subset:
        test = [t[:args.test_subset] for t in test]
    return Dataset(train, test, _data.DATASETS[name].num_classes, name, device)


# ----------------------------------------------------------------------------------------------------
# Schedule


class PaperSchedule:
    """Learning-rate factor per step: warm-up, then 1, divided by 10 at each milestone (LambdaLR)."""

    def __init__(self, total_steps: int, warmup_steps: int, warmup_factor: float, milestones):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        self.milestones = sorted(round(m * total_steps) for m in milestones)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_factor
        return 0.1 ** sum(step >= m for m in self.milestones)


# ----------------------------------------------------------------------------------------------------
# Training


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": None, "cuda": None}
    if "numpy" in sys.modules:
        name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("numpy") is not None:
        import numpy as np
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_python_random_state(state):
    """random.setstate wants tuples; a checkpoint may hand back lists."""
    if isinstance(state, list):
        return tuple(_as_python_random_state(s) for s in state)
    return state


class Trainer:
    """Model, optimizer, schedule and data order of one run; checkpoints that resume it exactly."""

    def __init__(self, args, info: _dist.DistInfo, data: Dataset):
        self.args, self.info, self.data = args, info, data
        device = self.device = info.device
        world = info.world_size
        if args.batch_size % world:
            raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} ranks")
        self.local_batch = args.batch_size // world
        self.steps_per_epoch = data.train_images.shape[0] // args.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{data.train_images.shape[0]} training images make no batch of {args.batch_size}")
        self.total_steps = self.steps_per_epoch * args.epochs
        self.sync_bn = args.sync_bn if args.sync_bn is not None else info.distributed
        if self.sync_bn and not args.fused and device.type == "cpu" and info.distributed:
            raise ValueError("synchronised BatchNorm on CPU needs the fused model (drop --no-fused, or "
                             "give --no-sync-bn)")
        self.channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"

        torch.manual_seed(args.seed)
        random.seed(args.seed)
        model = preact_resnet(args.depth, data.num_classes, fused=args.fused, backend=args.backend,
                              memory=args.memory, block=args.block, sync_bn=self.sync_bn)
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.module = model
        # DDP refuses nn.SyncBatchNorm in CPU modules; there the gradients are averaged by hand.
        self.average_by_hand = info.distributed and device.type == "cpu" and self.sync_bn
        if info.distributed and not self.average_by_hand:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        else:
            self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay)
        self.schedule = PaperSchedule(self.total_steps, args.warmup_steps, args.warmup_lr / args.lr, args.milestones)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.graphed = None
        if getattr(args, "cuda_graphs", False):
            reason = graph_unsupported_reason(device)
            if reason is None and self.scaler is not None:
                reason = "the fp16 GradScaler synchronises with the host every step (use --amp bf16)"
            if reason is None and info.distributed:
                reason = "not with several ranks (gradient all-reduce outside the graph)"
            if reason is not None:
                raise ValueError(f"--cuda-graphs: {reason}")
            self.graphed = GraphedStep(self._graph_loss, self.optimizer, warmup=3)
            self._graph_logits = None
        self.out = Path(args.out)
        self.epoch = 0          # epochs completed
        self.step = 0           # steps completed in the current epoch
        self.global_step = 0
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self._reset_meters()

    # --- pieces of a step

    def _reset_meters(self):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = torch.zeros((), dtype=torch.int64, device=self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def epoch_plan(self, epoch: int):
        """(order [N], crop offsets [N, 2], flips [N]) of one epoch: a function of (seed, epoch) only."""
        gen = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        n = self.data.train_images.shape[0]
        order = torch.randperm(n, generator=gen)
        offsets, flips = _data.augmentation_plan(n, gen)
        return order.to(self.device), offsets.to(self.device), flips.to(self.device)

    def _inputs(self, images):
        x = _data.normalize(images, self.data.mean, self.data.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batch(self, plan, step: int):
        """This rank's slice of global batch ``step``: (x float32 [b, 3, 32, 32], labels [b])."""
        order, offsets, flips = plan
        start = step * self.args.batch_size + self.info.rank * self.local_batch
        pos = slice(start, start + self.local_batch)
        index = order[pos]
        images = _data.augment(self.data.train_images[index], offsets[pos], flips[pos])
        return self._inputs(images), self.data.train_labels[index]

    def _graph_loss(self, x, target) -> torch.Tensor:
        """The step's loss for ``GraphedStep``; its logits are kept for the meters (under capture:
        the graph's static logits, which every replay rewrites)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            logits = self.model(x)
            loss = F.cross_entropy(logits, target)
        self._graph_logits = logits
        return loss

    def _graphed_train_step(self, x, target) -> torch.Tensor:
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        loss = self.graphed(x, target)
        self.scheduler.step()
        with torch.no_grad():
            self.loss_sum += loss.double() * target.shape[0]
            self.correct += (self._graph_logits.argmax(1) == target).sum()
            self.seen += target.shape[0]
        return loss

    def train_step(self, x, target) -> torch.Tensor:
        if self.graphed is not None:
            return self._graphed_train_step(x, target)
        with self.autocast():
            logits = self.model(x)
            loss = F.cross_entropy(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.average_by_hand:
            _dist.average_gradients(self.module)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.loss_sum += loss.detach().double() * target.shape[0]
            self.correct += (logits.argmax(1) == target).sum()
            self.seen += target.shape[0]
        return loss.detach()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean loss, error) on the test set, sharded over the ranks, in eval mode."""
        module, was_training = self.module, self.module.training
        module.eval()
        n = self.data.test_images.shape[0]
        mine = torch.arange(n, device=self.device).tensor_split(self.info.world_size)[self.info.rank]
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for index in mine.split(self.args.eval_batch_size):
            target = self.data.test_labels[index]
            with self.autocast():
                logits = module(self._inputs(self.data.test_images[index]))
            totals[0] += F.cross_entropy(logits.float(), target, reduction="sum").double()
            totals[1] += (logits.argmax(1) == target).sum()
            totals[2] += target.shape[0]
        module.train(was_training)
        loss, correct, count = _dist.all_reduce_sum(totals).tolist()
        return loss / max(count, 1), 1 - correct / max(count, 1)

    # --- checkpoints

    def state_dict(self) -> dict:
        """Everything a resumed run needs; the training meters summed over the ranks (collective)."""
        meters = _dist.all_reduce_sum(torch.stack([self.loss_sum, self.correct.double(), self.seen.double()]))
        return {
            "format": 1,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "step": self.step, "global_step": self.global_step,
            "meters": meters.cpu(),
            "rng": _rng_state(self.device),
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()},
        }

    def save(self, path: Path | None = None) -> Path:
        """Write the checkpoint (rank 0; every rank must call this). Atomic: never a half-written file;
        never one after a non-finite loss (NonFiniteLoss instead)."""
        self.check_loss()
        path = Path(path or self.out / "checkpoint.pt")
        state = self.state_dict()
        if self.info.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
        return path

    def load(self, path) -> None:
        """Continue from the checkpoint at ``path`` (CheckpointError if it cannot be resumed here)."""
        state = read_checkpoint(path)
        different = [k for k in ("depth", "block", "batch_size", "epochs", "lr", "seed", "dataset", "fused")
                     if state["args"].get(k) != getattr(self.args, k)]
        if different and self.info.is_main:
            warnings.warn(f"resuming {path} with different settings ({', '.join(different)}): the run will "
                          "not continue exactly as it would have", RuntimeWarning, stacklevel=2)
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            saved = state["args"]
            raise CheckpointError(
                f"{path} holds another model or optimizer (depth {saved.get('depth')}, block {saved.get('block')}; "
                f"this run: depth {self.args.depth}, block {self.args.block}): {_one_line(err)}") from err
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self._reset_meters()
        if self.info.is_main:  # the summed meters, counted once
            loss_sum, correct, seen = state["meters"].tolist()
            self.loss_sum.fill_(loss_sum)
            self.correct.fill_(round(correct))
            self.seen.fill_(round(seen))
        rng = dict(state["rng"])
        rng["python"] = _as_python_random_state(rng["python"])
        _set_rng_state(rng, self.device)

    def check_loss(self) -> None:
        """NonFiniteLoss if a training loss of the epoch so far was NaN or infinite (every rank calls this)."""
        total = _dist.all_reduce_sum(self.loss_sum).item()
        if not math.isfinite(total):
            raise NonFiniteLoss(f"the training loss became {total} by epoch {self.epoch + 1}, step {self.step} "
                                f"(lr {self.last_lr:.3g}): stopped; nothing was written after it (lower --lr?)")

    # --- the loop

    def fit(self) -> dict:
        """Train until the last epoch (or --stop-after); returns the last epoch's log row (or {})."""
        args, main = self.args, self.info.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._trim_log()
        row: dict = {}
        steps_this_run = 0
        while self.epoch < args.epochs:
            plan = self.epoch_plan(self.epoch)
            bar = Progress(self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{args.epochs}",
                           initial=self.step, bar=main and args.progress, leave=False)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            start, first_step = time.perf_counter(), self.step
            while self.step < self.steps_per_epoch:
                loss = self.train_step(*self.batch(plan, self.step))
                self.step += 1
                self.global_step += 1
                steps_this_run += 1
                shown = self.step % 20 == 0 or self.step == self.steps_per_epoch
                if shown:
                    self.check_loss()
                bar.update({"loss": f"{loss.item():.3f}", "lr": f"{self.last_lr:.3g}"}
                           if shown and bar.bar is not None else None)
                if args.save_every and self.global_step % args.save_every == 0:
                    self.save()
                if args.stop_after and steps_this_run >= args.stop_after:
                    bar.close()
                    path = self.save()
                    if main:
                        print(f"stopped after {steps_this_run} steps (epoch {self.epoch + 1}, step {self.step}); "
                              f"continue with --resume {path}", flush=True)
                    return row
            bar.close()
            seconds = time.perf_counter() - start
            row = self._end_epoch(seconds, (self.step - first_step) * args.batch_size)
        return row

    def _end_epoch(self, seconds: float, images: int) -> dict:
        test_loss, test_error = self.evaluate()
        loss_sum, correct, seen = _dist.all_reduce_sum(
            torch.stack([self.loss_sum, self.correct.double(), self.seen.double()])).tolist()
        peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else float("nan")
        self.epoch += 1
        row = {"epoch": self.epoch, "step": self.global_step, "lr": self.last_lr,
               "train_loss": loss_sum / max(seen, 1), "train_error": 1 - correct / max(seen, 1),
               "test_loss": test_loss, "test_error": test_error, "epoch_seconds": seconds,
               "images_per_second": images / seconds if seconds > 0 else float("nan"), "peak_memory_gib": peak}
        self.step = 0
        self._reset_meters()
        if self.info.is_main:
            self._append_log(row)
            print(f"epoch {row['epoch']}/{self.args.epochs}  train loss {row['train_loss']:.4f} "
                  f"error {100 * row['train_error']:.2f}%  test loss {test_loss:.4f} error {100 * test_error:.2f}%  "
                  f"lr {row['lr']:.3g}  {seconds:.1f}s  {row['images_per_second']:.0f} img/s", flush=True)
            if self.args.plot:
                plot_log(self.out / "log.csv", self.out / "curves.png")
        self.save()
        return row

    def _trim_log(self) -> None:
        """Keep the log rows of the epochs completed so far (a resumed run rewrites later ones)."""
        path = self.out / "log.csv"
        rows = []
        if path.exists() and (self.epoch or self.step):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= self.epoch]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def _append_log(self, row: dict) -> None:
        with open(self.out / "log.csv", "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                                                     for k, v in row.items()})

    def describe(self) -> str:
        args, info = self.args, self.info
        params = sum(p.numel() for p in self.module.parameters())
        backend = _backend.name_of(_backend.resolve(args.backend, self.device)) if args.fused else "plain PyTorch"
        return (f"preact_resnet{args.depth} ({params / 1e6:.2f} M parameters, {'fused' if args.fused else 'unfused'}, "
                f"backend {backend}, memory={args.memory}) on {self.data.name}: "
                f"{self.data.train_images.shape[0]} train / {self.data.test_images.shape[0]} test images\n"
                f"device {self.device} x {info.world_size} rank(s), batch {args.batch_size} "
                f"({self.local_batch} per rank), sync BN {self.sync_bn}, amp {args.amp}, "
                f"channels_last {self.channels_last}; {self.steps_per_epoch} steps/epoch, {self.total_steps} steps; "
                f"lr {args.lr} (warm-up {args.warmup_lr} for {args.warmup_steps} steps, /10 at "
                f"{self.schedule.milestones}); output {self.out}")


def plot_log(csv_path: Path, png_path: Path) -> bool:
    """Loss and error curves from the CSV log into a PNG; False (and a warning) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no curves.png (pip install matplotlib)", RuntimeWarning,
                      stacklevel=2)
        return False
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("test", "--")):
        ax_loss.plot(epochs, [float(r[f"{split}_loss"]) for r in rows], style, marker=".", label=split)
        ax_err.plot(epochs, [100 * float(r[f"{split}_error"]) for r in rows], style, marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="cross-entropy loss")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="classification error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


# ----------------------------------------------------------------------------------------------------
# Memory figures


def _probe(model, device, dtype, num_classes: int):
    """fits(batch): one SGD training step of ``model`` at that batch runs without running out of memory."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)

    def fits(batch: int) -> bool:
        try:
            x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            target = torch.randint(0, num_classes, (batch,), device=device)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            x = target = loss = None  # noqa: F841 (drop the references before emptying the cache)
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return fits


def measure_memory(args, device: torch.device) -> list[dict]:
    """Activation bytes per image (fused / plain x fp32 / bf16 x both memory modes) and batch estimates.

    Per image: saved bytes at batch 2 minus batch 1 (what grows with the batch); fixed: the rest
    (per-channel vectors). The estimate: (budget - 4 bytes x 3 per parameter (weights, gradients,
    momentum) - fixed) / per image; it leaves out transient buffers and the allocator's slack.
    """
    if args.memory_budget is not None:
        budget = args.memory_budget * 2 ** 30
    elif device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory
    else:
        budget = 80 * 2 ** 30
    rows = []
    for fused in (True, False):
        torch.manual_seed(args.seed)
        model = preact_resnet(args.depth, args.num_classes, fused=fused, backend=args.backend, block=args.block)
        model.to(device)
        state_bytes = 3 * 4 * sum(p.numel() for p in model.parameters())
        for dtype in (None, torch.bfloat16):
            for memory in MEMORY_MODES:
                model.memory = memory
                saved = []
                for batch in (1, 2):
                    x = torch.randn(batch, 3, 32, 32, device=device)
                    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                        saved.append(count_saved_bytes(model, x))
                per_image, fixed = saved[1] - saved[0], 2 * saved[0] - saved[1]
                row = {"model": "fused" if fused else "plain PyTorch", "dtype": "bf16" if dtype else "fp32",
                       "memory": memory, "mb_per_image": per_image / 1e6, "fixed_mb": fixed / 1e6,
                       "estimated_max_batch": max(0, math.floor((budget - state_bytes - fixed) / per_image)),
                       "budget_gib": budget / 2 ** 30}
                if args.probe_max_batch and device.type == "cuda":
                    row["measured_max_batch"] = largest_batch(_probe(model, device, dtype, args.num_classes),
                                                              start=64, resolution=8)
                rows.append(row)
        del model
    return rows


def print_memory_table(rows: list[dict], depth: int, device: torch.device) -> None:
    print(f"Saved activations of preact_resnet{depth} per 32x32 image (saved-tensor hooks, unique storages; "
          f"{device}); largest batch estimated for {rows[0]['budget_gib']:.0f} GiB")
    probe = "measured_max_batch" in rows[0]
    header = f"{'model':<14} {'dtype':<5} {'memory':<12} {'MB/image':>9} {'fixed MB':>9} {'est. max batch':>15}"
    print(header + (f" {'measured max':>13}" if probe else ""))
    for r in rows:
        line = (f"{r['model']:<14} {r['dtype']:<5} {r['memory']:<12} {r['mb_per_image']:>9.3f} "
                f"{r['fixed_mb']:>9.3f} {r['estimated_max_batch']:>15}")
        print(line + (f" {r['measured_max_batch']:>13}" if probe else ""))


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = _dist.setup(args.device, args.dist_backend)
    try:
        if args.measure_memory:
            if info.is_main:
                print_memory_table(measure_memory(args, info.device), args.depth, info.device)
            return 0
        try:
            data = load_dataset(args, info.device)
            trainer = Trainer(args, info, data)
        except (FileNotFoundError, ValueError) as err:
            return _fail(err)
        if args.resume:
            path = Path(args.out) / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
            if not path.is_file():
                return _fail(f"no checkpoint to resume at {path}")
            try:
                trainer.load(path)
            except CheckpointError as err:
                return _fail(err)
        if info.is_main:
            print(trainer.describe(), flush=True)
            if args.resume:
                print(f"resumed at epoch {trainer.epoch + 1}, step {trainer.step}", flush=True)
        try:
            trainer.fit()
        except NonFiniteLoss as err:
            return _fail(err, status=1)
        return 0
    finally:
        _dist.teardown()


def _fail(message, status: int = 2) -> int:
    """Print ``message`` as one error line (argparse's style) and return the exit status."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
