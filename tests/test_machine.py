"""The machine line in benchmark reports."""

from __future__ import annotations

import torch

from lpld_ray import machine
from lpld_ray.machine import cpu_model, describe_machine


def test_cpu_model_is_read_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU @ 3.00GHz\nflags\t\t: fpu\n")
    opened = []
    monkeypatch.setattr(machine, "open", lambda path, *a, **k: opened.append(path) or open(info, *a, **k), raising=False)
    assert cpu_model() == "Test CPU @ 3.00GHz" and opened == ["/proc/cpuinfo"]


def test_cpu_model_without_cpuinfo_falls_back_to_platform(monkeypatch):
    def no_cpuinfo(*_args, **_kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(machine, "open", no_cpuinfo, raising=False)
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "riscv64")
    assert cpu_model() == "riscv64"


def test_machine_line_is_one_line_and_names_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(machine, "cpu_model", lambda: "Test CPU")
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = describe_machine()
    assert "\n" not in line and "Test CPU, 7 CPUs, torch threads " in line and line.endswith(", no GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU 80GB")
    assert describe_machine().endswith(", GPU Test GPU 80GB")
