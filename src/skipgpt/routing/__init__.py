"""Routing core: routers, Gumbel decisions, forced policies, sparsity accounting."""
