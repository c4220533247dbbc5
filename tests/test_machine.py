"""The machine line in benchmark reports."""

from __future__ import annotations

import os

import torch

from lpld_ray.machine import cpu_model, describe_machine


def test_machine_line_names_cpu_count_threads_and_gpu():
    line = describe_machine()
    assert f"{os.cpu_count()} CPUs" in line and f"torch threads {torch.get_num_threads()}" in line
    assert cpu_model() in line
    assert ("GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU") in line
