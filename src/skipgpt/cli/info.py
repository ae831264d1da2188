"""`skipgpt info`: describe a model's routable structure or a router directory

Print the routable structure of MODEL (layers, parameters per module) and, with --routers, the router
config and whether it matches the model. It loads the model; nothing else heavy runs.
"""

from __future__ import annotations

import argparse
import json

from ..artifact import load_routers, read_config
from ..models.loading import load_model
from ..models.routed import RoutedModel
from ..routing.policies import reads_threshold, router_share
from .common import add_command, add_model_flags, add_routers


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, __doc__)
    add_model_flags(p, dtype=False)
    add_routers(p, "router directory to check against the model")
    return p


def run(args: argparse.Namespace) -> int:
    if args.routers:
        read_config(args.routers)  # a bad router directory fails before the model loads
    model, _ = load_model(args.model)
    routed = load_routers(model, args.routers) if args.routers else RoutedModel(model, name=args.model)
    c = routed.costs
    total = float((c.attn_params + c.mlp_params).sum())
    print(json.dumps(routed.config.to_dict()["base"], indent=2))
    print(f"decoder layers: {c.num_layers}; decoder parameters {total / 1e6:.1f}M "
          f"(attention {float(c.attn_params.sum()) / total:.1%}, MLP {float(c.mlp_params.sum()) / total:.1%})")
    if args.routers and not reads_threshold(routed.policy):
        print(f"routing: {routed.config.extra.get('routing')} baseline, target {routed.config.target_sparsity:.0%}; "
              f"its decisions come from the policy saved in skip_config.json, not from router logits and a threshold")
    elif args.routers:
        own = sum(p.numel() for p in routed.routers.parameters())
        print(f"routers: {routed.config.router} on {routed.config.router_input} input, "
              f"target {routed.config.target_sparsity:.0%}, threshold {routed.config.threshold:+.3f}; "
              f"{own / 1e6:.2f}M parameters")
    share = router_share(routed.policy) if args.routers else 0.0  # MoD-D's scores are its routers too
    if share:
        run = float(c.router_params.sum()) * share  # what a token runs: the folded last layers
        print(f"routers run on every token: {run / total:.2%} of the decoder, charged in every net sparsity figure")
    return 0
