"""Small helpers shared by the benchmarks: timing, machine description, atomic metrics files.

Not a benchmark itself (nothing runs on import or as a script). Benchmarks import it as
``from _common import ...``: running ``bench/<name>.py`` puts ``bench/`` on ``sys.path``.

Timing rules: warm up first, interleave the variants being
compared so that a noisy neighbour hits them alike, and report the minimum and the median over
repeats, never a single run.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from evocomp.files import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def keep_ratios(parser, text: str) -> list[float]:
    """``--ratios`` "0.333,0.111" as floats, each in (0, 1); a bad value is the parser's error."""
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--ratios: expected comma-separated numbers, got {text!r}")
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        parser.error(f"--ratios: every keep ratio must lie in (0, 1), got {ratios}")
    return ratios


def sync(device: torch.device | str | None) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, float]:
    """``(fn(), seconds)``, synchronising the device before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def collect(
    one_pass: Callable[[int], Mapping[str, float]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run ``warmup`` passes (discarded), then ``repeats`` passes; each returns {name: seconds}.

    Returns {name: [seconds of each kept pass]}.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for i in range(warmup):
        one_pass(i)
    samples: dict[str, list[float]] = {}
    for i in range(repeats):
        for name, seconds in one_pass(i).items():
            samples.setdefault(name, []).append(seconds)
    return samples


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Time callables side by side: each pass runs each once, the order rotated every pass."""
    names = list(fns)

    def one_pass(i: int) -> dict[str, float]:
        r = i % len(names)
        return {name: timed(fns[name], device)[1] for name in names[r:] + names[:r]}

    return collect(one_pass, repeats, warmup)


def summarize(seconds: list[float]) -> dict[str, float | int]:
    """{"min", "median", "repeats"} of a list of timings."""
    if not seconds:
        raise ValueError("summarize: no timings")
    return {"min": min(seconds), "median": statistics.median(seconds), "repeats": len(seconds)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the figures were measured on; the load average says whether the machine was shared."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    return info


def describe_machine(info: Mapping[str, Any]) -> str:
    """One line for the top of a benchmark's printout."""
    load = info.get("load_average_1m")
    return (
        f"{info['device']} ({info['device_name']}), {info['cpu_count']} CPUs, "
        f"torch {info['torch']} with {info['torch_threads']} threads"
        + (f", load average {load} at start" if load is not None else "")
    )


def command_line(argv: list[str] | None = None, script: str | Path | None = None) -> str:
    """The command being run, paths relative to the working directory where they lie under it.

    ``argv``/``script`` describe a call of a benchmark's ``main(argv)`` from Python (a test);
    by default the command is ``sys.argv``.
    """
    args = [str(script or sys.argv[0]), *argv] if argv is not None else list(sys.argv)

    def rel(path: str) -> str:
        p = Path(path)
        return os.path.relpath(p) if p.is_absolute() and p.is_relative_to(Path.cwd()) else path

    return shlex.join([rel(sys.executable), rel(args[0]), *args[1:]])


def begin(args) -> tuple[float, dict]:
    """Start a benchmark run: thread count from ``--threads``, machine facts printed; (start, machine)."""
    import torch

    start = time.perf_counter()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    print(f"machine: {describe_machine(machine)}", flush=True)
    return start, machine


def finish(report: dict, out, start: float, print_report) -> dict:
    """End a benchmark run: wall time recorded, JSON written atomically, table printed."""
    report["wall_seconds"] = time.perf_counter() - start
    write_json_atomic(out, report)
    print_report(report)
    print(f"\nwrote {out} in {report['wall_seconds']:.0f} s")
    return report
