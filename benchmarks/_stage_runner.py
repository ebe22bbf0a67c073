"""Running a pipeline stage function in a fresh process, as `dvc repro` does, and measuring it there.

In one long-lived process, the heap a stage freed stays mapped (glibc keeps it), so every later stage
would look as large as the largest before it; in its own process each stage's peak RSS is its own, and
the kernel's high-water mark (getrusage) gives it exactly. The child's address space is capped so a
stage that would need more memory fails at once with torch's "can't allocate" instead of pushing a
shared machine into swap.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import resource
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import moder.baselines
import stages.train
from moder.text import TextTower

GB = 1e9


@dataclass
class Counters:
    """What one stage did: prompts the text tower encoded, and optimisation steps and their time."""

    grad: int = 0  # prompts encoded with autograd on (training)
    no_grad: int = 0
    steps: int = 0  # optimisation steps; each encodes all of a task's classes
    train_seconds: float = 0.0  # inside train_experts: the part that grows with the epochs


@dataclass
class StageResult:
    name: str
    group: str
    seconds: float
    cpu_seconds: float  # every thread of the process: unlike wall time, not inflated by other users of the cores
    peak_rss: float  # bytes, the stage process's high-water mark (imports included, as under DVC)
    counters: Counters = field(default_factory=Counters)
    failure: str | None = None
    start_seconds: float = 0.0  # starting the process and importing torch, moder and stages: not in `seconds`
    value: Any = None  # what the function returned, when asked for


def memory_now() -> tuple[int, int] | None:
    """(virtual size, resident set) of this process in bytes, from /proc (None where there is none)."""
    try:
        pages = open("/proc/self/statm").read().split()
    except OSError:
        return None
    size = os.sysconf("SC_PAGE_SIZE")
    return int(pages[0]) * size, int(pages[1]) * size


def cap_address_space(cap_bytes: float) -> None:
    """Let the process grow to about `cap_bytes` resident: the address-space limit is today's virtual size
    plus what is left of the cap. Approximate (mappings never touched count too), but a tensor that does
    not fit fails at once, catchably."""
    now = memory_now()
    if now is not None:
        virtual, resident = now
        limit = int(virtual + max(cap_bytes - resident, 0))
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


@contextmanager
def counted() -> Iterator[Counters]:
    """Counts the token rows of every `TextTower.encode` call (every stage encodes through it) and times
    `train_experts` where the train and finetune stages look it up (their own module's name for it)."""
    count, encode, train_experts = Counters(), TextTower.encode, stages.train.train_experts

    def counting_encode(self: TextTower, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            count.grad += tokens.shape[0]
        else:
            count.no_grad += tokens.shape[0]
        return encode(self, tokens, *args, **kwargs)

    def timed_train_experts(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = train_experts(*args, **kwargs)
            count.steps += len(result.losses)  # one loss per optimisation step
            return result
        finally:
            count.train_seconds += time.perf_counter() - start

    TextTower.encode = counting_encode  # type: ignore[method-assign]
    stages.train.train_experts = moder.baselines.train_experts = timed_train_experts
    try:
        yield count
    finally:
        TextTower.encode = encode  # type: ignore[method-assign]
        stages.train.train_experts = moder.baselines.train_experts = train_experts


def failure_of(error: BaseException, cap_bytes: float) -> str:
    """One line for a stage that raised: running out of memory under the cap is the expected failure at scale
    (torch's allocator, or an mmap, refused); anything else is shown as the error it is, and the run goes on."""
    text = str(error).splitlines()[0] if str(error) else ""
    if isinstance(error, MemoryError) or "allocate memory" in text:  # "can't allocate" / "Cannot allocate"
        size = re.search(r"allocate (\d+) bytes|mmap (\d+) bytes", text)
        what = f"a {int(next(g for g in size.groups() if g)) / 1e6:,.0f} MB allocation" if size else "an allocation"
        return f"out of memory: {what} went over the {cap_bytes / GB:g} GB cap"
    return f"error: {type(error).__name__}: {text[:200]}"


def measure(fn: Callable[..., Any], args: tuple, cap_bytes: float, keep_value: bool) -> StageResult:
    """In the stage's process: run fn(*args) under the memory cap, counting and timing it."""
    cap_address_space(cap_bytes)
    start, cpu_start = time.perf_counter(), time.process_time()
    value, failure = None, None
    with counted() as count:
        try:
            value = fn(*args)
        except Exception as error:  # reported on the stage's line; the later stages are still measured
            failure = failure_of(error, cap_bytes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return StageResult("", "", seconds, cpu_seconds, peak, count, failure, value=value if keep_value else None)


class StageRunner:
    """Runs each stage function in a fresh process, prints a line per stage as it ends, keeps the results."""

    def __init__(self, cap_gb: float) -> None:
        self.cap_gb = cap_gb
        self.results: list[StageResult] = []

    def run(self, name: str, group: str, fn: Callable[..., Any], *args: Any, keep_value: bool = False) -> StageResult:
        started = time.perf_counter()
        # spawn, not fork: a forked child of a process that has run torch's thread pool can hang
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            try:
                result = pool.submit(measure, fn, args, self.cap_gb * GB, keep_value).result()
            except BrokenProcessPool:
                result = StageResult("", "", 0.0, 0.0, 0.0, failure="its process died (killed for memory?)")
        result.name, result.group = name, group
        result.start_seconds = max(time.perf_counter() - started - result.seconds, 0.0)
        self.results.append(result)
        print(stage_line(result), flush=True)
        return result


def header(first: str) -> str:
    return f"  {first:<31}{'wall s':>9}{'CPU s':>9}{'RSS GB':>9}  {'prompts grad':>11} /{'no grad':>10}"


def stage_line(result: StageResult) -> str:
    count = result.counters
    note = f"  {count.steps} steps, {count.train_seconds / count.steps:.2f} s/step" if count.steps else ""
    if result.failure:  # the prompts counted are those it tried to encode; its last step did not finish
        note = f"  FAILED{f' in step {count.steps}' if count.steps else ''}: {result.failure}"
    return (
        f"  {result.name:<31}{result.seconds:>9.1f}{result.cpu_seconds:>9.1f}{result.peak_rss / GB:>9.2f}  "
        f"{count.grad:>11,} /{count.no_grad:>10,}{note}"
    )


def group_rows(results: list[StageResult]) -> list[str]:
    """One row per stage group (all train@ stages, ...): wall and CPU summed, the largest peak RSS."""
    rows = [header(f"{'stage group':<24}{'stages':>7}")]
    for group in dict.fromkeys(r.group for r in results):
        members = [r for r in results if r.group == group]
        failed = sum(1 for r in members if r.failure)
        rows.append(
            f"  {group:<24}{len(members):>7}{sum(r.seconds for r in members):>9.1f}"
            f"{sum(r.cpu_seconds for r in members):>9.1f}{max(r.peak_rss for r in members) / GB:>9.2f}  "
            f"{sum(r.counters.grad for r in members):>11,} /{sum(r.counters.no_grad for r in members):>10,}"
            + (f"  {failed} FAILED" if failed else "")
        )
    total, cpu = sum(r.seconds for r in results), sum(r.cpu_seconds for r in results)
    return [*rows, f"  {'total':<31}{total:>9.1f}{cpu:>9.1f}{max(r.peak_rss for r in results) / GB:>9.2f}"]
