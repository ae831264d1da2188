"""RoutedModel: a Hugging Face causal LM whose decoder layers consult SkipGPT routers.

The HF model object is kept as it is: its decoder layers get a routed `forward` on the instance,
and the routers live in a separate RouterBank, so `routed.model.state_dict()` keys, PEFT target
names and `generate()` stay stock. Two execution modes share the same decisions:
- "masked": every module runs and its output is multiplied by the execute gate (training semantics);
- "sparse": only executing tokens are computed (see skipgpt.inference.sparse).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import SkipConfig
from ..errors import ConfigError
from ..routing import policies
from ..routing.policies import Policy
from ..routing.router import KINDS, RouterBank, argmax_gate, sample_gate, straight_through_gumbel
from ..routing.sparsity import SparsityMeter, SparsityReport, ratios, skip_totals
from .adapters import LayerParts, find_decoder, find_layers, fingerprint, module_costs, unwrap

MODES = ("masked", "sparse")


class RoutedModel(nn.Module):
    def __init__(self, model: nn.Module, config: SkipConfig | None = None, name: str | None = None):
        super().__init__()
        self.model = model
        self.layers: list[LayerParts] = find_layers(model)
        hf = unwrap(model)
        self.config = config or SkipConfig()
        base = self.config.base
        base.name = base.name or name or getattr(hf.config, "skipgpt_name", "") or hf.config.name_or_path
        base.architecture = (hf.config.architectures or [type(hf).__name__])[0]
        base.model_type = hf.config.model_type
        base.hidden_size = hf.config.hidden_size
        base.num_layers = len(self.layers)
        base.fingerprint = base.fingerprint or fingerprint(model)
        param = next(model.parameters())
        # Inference (argmax) until a trainer calls routers.train(): a loaded model must be deterministic.
        self.routers = RouterBank(len(self.layers), hf.config.hidden_size, self.config).to(param.device).eval()
        self.costs = module_costs(model, self.layers)
        self.meter = SparsityMeter(self.costs)

        self.mode = "masked"
        self.temperature = 1.0  # used only while self.routers.training
        self.noise = 1.0  # scale of the training Gumbel noise (1 = standard Gumbel-softmax)
        self.sample = False  # Gumbel sampling at inference (the published code's behaviour)
        self.policy: Policy | None = None
        self.track = True  # accumulate sparsity statistics
        self.gradient_checkpointing = False  # trade compute for activation memory in training
        self.last_totals: dict[str, torch.Tensor] | None = None
        self._gates: list[list[torch.Tensor | None]] = [[None, None] for _ in self.layers]
        self._token_mask: torch.Tensor | None = None
        self._context: torch.Tensor | None = None
        self._hooks: list = []
        self.patch()

    # -- wiring -------------------------------------------------------------------------------------------

    def patch(self) -> RoutedModel:
        """Route the HF model's decoder layers through this object (done on construction)."""
        if self._hooks:
            return self
        decoder = find_decoder(self.model)
        if any("forward" in parts.layer.__dict__ for parts in self.layers):
            raise ConfigError("this model is already routed by another RoutedModel; call .unpatch() on that one first")
        for i, parts in enumerate(self.layers):
            signature = inspect.signature(type(parts.layer).forward)
            parts.layer.forward = functools.partial(_routed_layer_forward, self, i, parts, signature)
        self._hooks = [
            decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True),
            decoder.register_forward_hook(self._after_decoder),
        ]
        return self

    def unpatch(self) -> nn.Module:
        """Restore the plain HF model (routers detached) and return it."""
        for parts in self.layers:
            parts.layer.__dict__.pop("forward", None)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.model

    def _before_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs.get("inputs_embeds")
        batch, seq = x.shape[0], x.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._token_mask = mask[:, -seq:].to(torch.bool)
        else:
            self._token_mask = torch.ones(batch, seq, dtype=torch.bool, device=x.device)
        self._context = None
        self._gates = [[None, None] for _ in self.layers]

    def _after_decoder(self, module: nn.Module, args: tuple, output) -> None:
        if not self.track or any(g is None for pair in self._gates for g in pair):
            return
        self.last_totals = skip_totals(*self.last_forward(), self.costs)
        self.meter.add(self.last_totals)

    # -- decisions ------------------------------------------------------------------------------------------

    def gate(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """Execute gate (batch, seq) in {0, 1} for module `kind` of `layer`, given its router input x."""
        if self.policy is not None:
            g = self.policy(layer, kind, x).to(torch.float32)
        else:
            g = self.decide(self.routers.get(layer, kind)(x))
        self._gates[layer][KINDS.index(kind)] = g
        return g

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Execute gate from router logits: straight-through Gumbel in training, else argmax (or a sample)."""
        if self.routers.training and torch.is_grad_enabled():
            return straight_through_gumbel(logits, self.temperature, self.noise)
        if self.sample:
            return sample_gate(logits, self.config.threshold)
        return argmax_gate(logits, self.config.threshold)

    # -- user API -------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def token_mask(self) -> torch.Tensor | None:
        """(B, T) bool: which tokens of the forward pass in progress are real (not padding)."""
        return self._token_mask

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.config.threshold = float(value)

    def set_mode(self, mode: str) -> RoutedModel:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        return self

    def force(self, what: str | torch.Tensor | Policy | None) -> RoutedModel:
        """Override the routers: "execute", "skip", a (L, 2, B, T) bool mask, a policy, or None (routers)."""
        if isinstance(what, str):
            table = {"execute": policies.execute_all, "skip": policies.skip_all}
            if what not in table:
                raise ConfigError(f"force() takes 'execute', 'skip', a mask, a policy or None, got {what!r}")
            what = table[what]
        elif isinstance(what, torch.Tensor):
            what = policies.from_masks(what)
        self.policy = what
        return self

    @contextmanager
    def forced(self, what: str | torch.Tensor | Policy | None):
        saved = self.policy
        self.force(what)
        try:
            yield self
        finally:
            self.policy = saved

    @contextmanager
    def mode_as(self, mode: str):
        saved = self.mode
        self.set_mode(mode)
        try:
            yield self
        finally:
            self.mode = saved

    def sparsity(self) -> SparsityReport:
        """Realised sparsity over all tokens since the last reset_sparsity()."""
        return self.meter.report()

    def reset_sparsity(self) -> None:
        self.meter.reset()

    def realised_sparsity(self, accounting: str = "param") -> dict[str, torch.Tensor]:
        """Ratios of the last forward pass, differentiable through straight-through gates."""
        if self.last_totals is None:
            raise RuntimeError("no routed forward pass has run yet")
        r = ratios(self.last_totals, self.costs)
        r["target_metric"] = r[accounting]
        return r

    def last_forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates (L, 2, B, T) (differentiable in training), non-pad mask (B, T) and context lengths (B, T)
        of the last forward pass: what the sparsity accounting and the regulariser are computed from."""
        if any(g is None for pair in self._gates for g in pair):
            raise RuntimeError("no complete routed forward pass has run yet")
        gates = torch.stack([torch.stack(pair) for pair in self._gates]).float()
        context = self._context if self._context is not None else torch.ones_like(gates[0, 0])
        return gates, self._token_mask, context.expand_as(gates[0, 0])

    def decisions(self) -> torch.Tensor:
        """Execute decisions of the last forward pass as a (L, 2, B, T) bool tensor."""
        return torch.stack([torch.stack(pair) for pair in self._gates]) > 0.5

    def router_parameters(self):
        return self.routers.parameters()

    def freeze_base(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)


def _routed_layer_forward(
    routed: RoutedModel, index: int, parts: LayerParts, signature: inspect.Signature, *args, **kwargs
) -> torch.Tensor:
    if args[1:]:  # positional extras: name them as the layer's own forward would
        bound = signature.bind(parts.layer, *args, **kwargs)
        kwargs = dict(bound.arguments)
        kwargs.pop("self", None)
        kwargs.update(kwargs.pop("kwargs", {}))
        hidden = kwargs.pop("hidden_states")
    elif args:
        hidden = args[0]
    else:
        hidden = kwargs.pop("hidden_states")
    if index == 0:
        pos = kwargs.get("position_ids")
        routed._context = None if pos is None else (pos + 1)
    # Training always runs masked: a token whose module is not computed would give its router no gradient.
    if routed.mode == "sparse" and not (routed.routers.training and torch.is_grad_enabled()):
        from ..inference.sparse import sparse_layer_forward

        return sparse_layer_forward(routed, index, parts, hidden, kwargs)
    if routed.gradient_checkpointing and torch.is_grad_enabled():
        # Recompute the layer in backward; the saved RNG state replays the same Gumbel noise.
        # A KV cache would be appended to twice, so training under checkpointing runs without one.
        kwargs = {**kwargs, "cache": None, "use_cache": False}
        return checkpoint(_masked_layer_forward, routed, index, parts, hidden, kwargs, use_reentrant=False)
    return _masked_layer_forward(routed, index, parts, hidden, kwargs)


def _masked_layer_forward(
    routed: RoutedModel, index: int, parts: LayerParts, hidden: torch.Tensor, kwargs: dict
) -> torch.Tensor:
    x = hidden
    g = routed.gate(index, "attn", x)
    h = parts.attn(hidden_states=parts.attn_norm(x), **kwargs)[0]
    if parts.attn_out_norm is not None:
        h = parts.attn_out_norm(h)
    x = x + h * g.unsqueeze(-1).to(h.dtype)
    g = routed.gate(index, "mlp", x if routed.config.router_input == "module" else hidden)
    h = parts.mlp(parts.mlp_norm(x))
    if parts.mlp_out_norm is not None:
        h = parts.mlp_out_norm(h)
    return x + h * g.unsqueeze(-1).to(h.dtype)
