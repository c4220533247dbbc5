"""lpld-ray: LPLD dataset distillation (class-wise synthesis, pruned soft labels) on Ray."""

__version__ = "0.1.0"
