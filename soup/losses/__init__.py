"""Loss functions: pure functions over tensors, one file per family, registered by name."""
