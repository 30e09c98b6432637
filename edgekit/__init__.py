"""edgekit: per-layer compression for a target, verified export, signed bundles, and the agent that runs them."""

__version__ = "0.1.0"
