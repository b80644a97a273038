"""vqatune: reproducible QLoRA fine-tuning of image-text-to-text models for medical VQA."""

__version__ = "0.1.0"

from . import cpu_numerics as _cpu_numerics
from . import tracing as _tracing

# First, before anything runs a torch kernel: the same CPU arithmetic on every x86-64 machine
# (a no-op with a CUDA device or VQATUNE_CPU_NUMERICS=native; see vqatune.cpu_numerics).
_cpu_numerics.pin_cpu_numerics()
_tracing.install()  # no-op unless VQATUNE_TRACE is set (see vqatune.tracing)
