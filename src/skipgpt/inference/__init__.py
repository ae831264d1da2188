"""Inference that really skips: sparse execution, generation with routing, speed measurement."""
