"""Model adapters, the routed wrapper, and model loading."""
