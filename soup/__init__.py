"""soup: a Hydra-composed research harness for fine-tuning and post-training."""

__version__ = "0.1.0"

# Before any dependency is imported: drop the known-harmless messages torchao, torch and
# bitsandbytes log at import (each named, with why, in soup/quiet.py).
from soup.quiet import quiet_known_noise  # noqa: E402

quiet_known_noise()
