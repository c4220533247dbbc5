"""The machine a benchmark ran on, in one line for its report."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """Host, CPU model and count, torch threads, Python, and the GPU when there is one."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{platform.node()}: {cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
            f"Python {platform.python_version()}{gpu}")
