"""vqatune: reproducible QLoRA fine-tuning of image-text-to-text models for medical VQA."""

__version__ = "0.1.0"
