"""`skipgpt info`: what a model or router directory is, without running anything heavy."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="describe a model's routable structure or a router directory",
        description="Print the routable structure of MODEL (layers, parameters per module) and, with "
        "--routers, the router config and whether it matches the model.",
    )
    p.add_argument(
        "--model", default="smollm2-135m", help="hub name, HF folder, .gguf file or alias (default %(default)s)"
    )
    p.add_argument("--routers", default=None, help="router directory to check against the model")
    return p


def run(args: argparse.Namespace) -> int:
    from ..artifact import load_routers
    from ..models.loading import load_model
    from ..models.routed import RoutedModel

    model, _ = load_model(args.model)
    routed = load_routers(model, args.routers) if args.routers else RoutedModel(model, name=args.model)
    c = routed.costs
    total = float((c.attn_params + c.mlp_params).sum())
    print(json.dumps(routed.config.to_dict()["base"], indent=2))
    print(f"decoder layers: {c.num_layers}; decoder parameters {total / 1e6:.1f}M "
          f"(attention {float(c.attn_params.sum()) / total:.1%}, MLP {float(c.mlp_params.sum()) / total:.1%})")
    if args.routers:
        print(f"routers: {routed.config.router} on {routed.config.router_input} input, "
              f"target {routed.config.target_sparsity:.0%}, threshold {routed.config.threshold:+.3f}")
    return 0
