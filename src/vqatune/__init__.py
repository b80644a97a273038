"""vqatune: reproducible QLoRA fine-tuning of image-text-to-text models for medical VQA."""

__version__ = "0.1.0"

from . import tracing as _tracing

_tracing.install()  # no-op unless VQATUNE_TRACE is set (see vqatune.tracing)
