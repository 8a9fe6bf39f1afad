"""What the training CLI and the benchmarks share about runs: the largest-batch search, the
out-of-memory test and the progress display."""
from __future__ import annotations

import gc
import sys
import time

import torch


def largest_batch(fits, cap: int = 1 << 16, start: int = 1, resolution: int = 1) -> int:
    """The largest batch in [1, cap] for which ``fits(batch)`` holds, or 0 if none does.

    ``fits`` must be monotone (True up to some size, False above). Doubles from ``start`` until a
    batch fails or ``cap`` is reached, then bisects between the last fit and the first failure
    until they are at most ``resolution`` apart (1: exact). Returns a batch that was seen to fit.
    """
    lo, batch = 0, max(1, min(start, cap))
    while fits(batch):
        lo = batch
        if batch >= cap:
            return lo
        batch = min(2 * batch, cap)
    hi = batch
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def is_oom(err: BaseException) -> bool:
    """Whether an exception says the GPU ran out of memory (torch's own error, or cuDNN / cuBLAS
    failing to allocate)."""
    text = str(err)
    return (isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text
            or "ALLOC_FAILED" in text or "CUDNN_STATUS_ALLOC" in text)


def release(device: torch.device) -> None:
    """Return freed memory to the device (after an out-of-memory error or between runs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Progress:
    """Progress of a known number of steps: a tqdm bar on a terminal when tqdm is installed and
    ``bar`` is on; ``end(text)`` also prints a line per finished item on stdout (so logs show it)."""

    def __init__(self, total: int, desc: str = "", initial: int = 0, unit: str = "it", bar: bool = True,
                 leave: bool = True):
        self.bar = None
        if bar:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                                disable=None, dynamic_ncols=True, leave=leave)
            except ImportError:
                pass
        self.total, self.done, self.start = total, initial, time.perf_counter()

    def begin(self, text: str) -> None:
        """Name the item now running (the bar's description)."""
        if self.bar is not None:
            self.bar.set_description(text)

    def update(self, postfix: dict | None = None) -> None:
        """One more step done; ``postfix`` (shown on the bar) when given."""
        self.done += 1
        if self.bar is not None:
            self.bar.update()
            if postfix is not None:
                self.bar.set_postfix(postfix, refresh=False)

    def end(self, text: str) -> None:
        """One more item done, with a line saying how it went."""
        self.done += 1
        line = f"[{self.done}/{self.total}, {time.perf_counter() - self.start:.0f} s] {text}"
        if self.bar is None:
            print(line, flush=True)
        else:
            self.bar.write(line, file=sys.stdout)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
