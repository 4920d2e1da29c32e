"""Shared by the benchmark scripts: machine description, timing, and the Markdown result file."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "babylm_like"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine() -> dict[str, Any]:
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for mod in ("transformers", "tokenizers", "zarr", "numcodecs", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["cachekd_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def hardware_tag() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-").lower()
    return f"cpu{os.cpu_count()}"


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def write_result(theme: str, title: str, config: dict[str, Any], table_md: str, notes: str = "",
                 results_dir: str | Path | None = None) -> Path:
    """Write ``<results_dir>/<theme>_<hardware>_<date>.md`` (default directory: benchmarks/results)."""
    out = Path(results_dir) if results_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    path = out / f"{theme}_{hardware_tag()}_{date}.md"
    m = machine()
    lines = [f"# {title}", "", f"Run {date} with `{' '.join([Path(sys.argv[0]).name] + sys.argv[1:])}`.", "",
             "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in m.items()]
    lines += ["", "## Config", ""] + [f"- {k}: {v}" for k, v in config.items()]
    lines += ["", "## Results", "", table_md.rstrip(), ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    path.write_text("\n".join(lines))
    return path
