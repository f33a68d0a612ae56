"""Config schemas (Hydra ConfigStore) and cross-group validation."""

from soup.config.schema import SoupConfig, register_configs
from soup.config.validate import resolve_device, validate

__all__ = ["SoupConfig", "register_configs", "resolve_device", "validate"]
