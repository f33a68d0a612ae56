"""Memory features that wrap the model: gradient checkpointing tiers, activation offloading."""
