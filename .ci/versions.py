"""Print what a test run used, so a red run elsewhere can be compared with a green one (versions, CPU, threads)."""
import importlib.metadata as md
import os
import platform

import torch

NAMES = ("torch", "torchvision", "lightning", "torchmetrics", "jsonargparse", "numpy", "timm", "wandb", "litdata",
         "flwr", "torchdiffeq")


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


print("python", platform.python_version(), "|", platform.platform())
print(" | ".join(f"{name} {version(name)}" for name in NAMES))
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor() or "unknown") if os.path.exists("/proc/cpuinfo") else platform.processor()
print(f"cpu {cpu} | {os.cpu_count()} logical cores | torch threads {torch.get_num_threads()} | "
      f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
