"""soup: a Hydra-composed research harness for fine-tuning and post-training."""

__version__ = "0.1.0"
