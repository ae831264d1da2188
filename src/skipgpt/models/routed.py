"""The SkipGPT routing core, top to bottom: the per-forward state, the RoutedModel that owns the routers
and makes the gate decisions, and the routed decoder-layer forward. The routers, forecasters and Gumbel
gates themselves are in skipgpt.models.routers.

The Hugging Face model object is kept as it is: its decoder layers get a routed `forward` on the
instance and the routers live in a separate RouterBank, so `routed.model.state_dict()` keys, PEFT
target names and `generate()` stay stock. Two execution modes share the same decisions:
- "masked": every module runs and its output is multiplied by the execute gate (training semantics);
- "sparse": only executing tokens are computed (skipgpt.models.sparse); inference only, since a
  token whose module is not computed would give its router no gradient.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ACCOUNTINGS, SkipConfig
from ..errors import ConfigError
from ..routing import policies
from ..routing.policies import KIND_INDEX, Policy
from ..routing.sparsity import SparsityMeter, SparsityReport, ratios, skip_totals
from .adapters import LayerParts, find_decoder, find_layers, fingerprint, module_costs, unwrap
from .routers import Fold, Forecaster, ForecasterBank, Router, RouterBank, sample_gate, straight_through_gumbel
from .sparse import gated, run_attention, run_mlp, sparse_attention, sparse_mlp

# The router names lived here before routers.py split off; scripts still import them from this module.
__all__ = [
    "MODES", "ForwardState", "RoutedModel",
    "Fold", "Forecaster", "ForecasterBank", "Router", "RouterBank", "sample_gate", "straight_through_gumbel",
]

MODES = ("masked", "sparse")

# -- the state of one forward pass -------------------------------------------------------------------------


@dataclass
class ForwardState:
    """What one forward pass decided, created when the decoder starts and read by the loss and the
    sparsity accounting: the execute gate of every module, which tokens are real, and how many keys
    each token attends to."""

    token_mask: torch.Tensor  # (B, T) bool, False for padding
    num_layers: int
    # [layer][kind] (B, T): float straight-through gates while routers train, bool decisions otherwise
    gates: list[list[torch.Tensor | None]] = field(default_factory=list)
    context: torch.Tensor | None = None  # (B, T) real keys visible to each token (position + 1)
    # (B, T) real keys up to each token, from a 2-D padding mask: bounds `context` at left-padded rows, whose
    # positions count the pads unless the caller passes position ids (generate does)
    real_keys: torch.Tensor | None = None
    router_share: float = 1.0  # of the routers' cost each token pays: 0 when a fixed or random policy decides

    def __post_init__(self) -> None:
        self.gates = [[None, None] for _ in range(self.num_layers)]

    @property
    def complete(self) -> bool:
        return all(g is not None for pair in self.gates for g in pair)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gates (L, 2, B, T) (differentiable in training), real-token mask (B, T) and context lengths (B, T)."""
        if not self.complete:
            raise RuntimeError("the forward pass did not reach every decoder layer")
        flat = [g for pair in self.gates for g in pair]
        gates = torch.stack(flat).float().view(self.num_layers, 2, *flat[0].shape)
        context = self.context if self.context is not None else torch.ones_like(gates[0, 0])
        return gates, self.token_mask, context.expand_as(gates[0, 0])

    def totals(self, costs) -> dict[str, torch.Tensor]:
        """The sums behind every sparsity ratio of this pass (differentiable in the gates)."""
        return skip_totals(*self.stacked(), costs, self.router_share)


# -- the routed model --------------------------------------------------------------------------------------


class RoutedModel(nn.Module):
    """A HF causal LM whose decoder layers consult a router before every attention and MLP module.

    Settings a caller may change for a while go through `using(...)` (or `forced` / `mode_as`), which
    restores them afterwards: mode, policy, sample, track, temperature, noise, real_tokens.
    """

    SETTINGS = ("mode", "policy", "sample", "track", "temperature", "noise", "real_tokens")

    def __init__(self, model: nn.Module, config: SkipConfig | None = None, name: str | None = None):
        super().__init__()
        self.model = model
        self.layers: list[LayerParts] = find_layers(model)
        if any(p.is_meta for p in model.parameters()):
            raise ConfigError("the model has weights on the meta device (init_empty_weights, or offloaded by a "
                              "device_map): load or dispatch its weights onto real devices before routing it")
        hf = unwrap(model)
        # its own copy: the name, fingerprint and threshold filled in below are this model's, not the caller's
        self.config = copy.deepcopy(config) if config is not None else SkipConfig()
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
        rank = self.config.forecaster_rank
        # None for the paper's plain skip, so rank 0 runs exactly the code (and numbers) it always did.
        self.forecasters = None
        if rank:
            self.forecasters = ForecasterBank(len(self.layers), hf.config.hidden_size, rank).to(param.device)
        self.costs = module_costs(model, self.layers, 0 if rank == 0 else self.forecasters.params_per_module(),
                                  self.routers.params_per_module())
        self.meter = SparsityMeter(self.costs)
        self.gradient_checkpointing = False  # trade compute for activation memory in training
        self.adapter: Path | None = None  # the LoRA adapter folder applied to the model (artifact.apply_adapter)
        # an adapter folded into the base weights (apply_adapter's merge, merge_lora): saved, they would pass for
        # the plain base, which float16 weights' fingerprint cannot tell
        self.merged = False
        # settings (see using())
        self.mode = "masked"
        self.policy: Policy | None = None  # decisions that do not come from the routers
        self.sample = False  # Gumbel sampling at inference (the published code's behaviour)
        self.track = True  # accumulate sparsity statistics in self.meter
        self.temperature = 1.0  # Gumbel-softmax temperature, used only while routers train
        self.noise = 1.0  # scale of the training Gumbel noise (1 = standard Gumbel-softmax)
        # (B, T) bool: the real tokens of the passes to come, for callers that know the padding but pass no mask
        # (the harness: a mask would hide a real id-0 token from its own query); None: read from the mask
        self.real_tokens: torch.Tensor | None = None
        # the last forward pass
        self.state: ForwardState | None = None
        self._folds: list | None = None  # the routers' folds for this pass (inference only)
        self._argmax: list | None = None  # the same when they decide alone (see _start_forward)
        self._sparse = False  # this pass computes executing tokens only
        self._replay: ForwardState | None = None  # the pass a checkpointed layer recomputes in backward
        self._hooks: list = []
        self._replaced: list = []  # per layer, the forward that patch() replaced (None: the class's)
        self.patch()

    # -- wiring ------------------------------------------------------------------------------------------

    def patch(self) -> RoutedModel:
        """Route the HF model's decoder layers through this object (done on construction)."""
        if self._hooks:
            return self
        if any(_routed_slot(parts.layer) for parts in self.layers):
            raise ConfigError("this model is already routed by another RoutedModel; call .unpatch() on that one first")
        self._replaced = []
        for i, parts in enumerate(self.layers):
            signature = inspect.signature(type(parts.layer).forward)
            slot = _forward_slot(parts.layer)
            self._replaced.append(parts.layer.__dict__.get(slot))
            setattr(parts.layer, slot, functools.partial(_routed_layer_forward, self, i, parts, signature))
        decoder = find_decoder(self.model)
        self._hooks = [
            decoder.register_forward_pre_hook(self._start_forward, with_kwargs=True),
            decoder.register_forward_hook(self._end_forward),
        ]
        return self

    def unpatch(self) -> nn.Module:
        """Restore the plain HF model (routers detached) and return it."""
        for parts, replaced in zip(self.layers, self._replaced):
            layer, slot = parts.layer, _routed_slot(parts.layer)
            if slot == "forward" and replaced is None:
                del layer.forward  # the class's forward again
            elif slot is not None:  # what was there; accelerate's hook, added after routing, calls the class's
                setattr(layer, slot, replaced or functools.partial(type(layer).forward, layer))
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.model

    def _apply(self, fn, recurse: bool = True):
        """.to(), .half(), .cuda() and the like convert the base model; the routers and forecasters follow its device
        but stay fp32 (their margins are compared with a calibrated threshold: bf16 would change decisions)."""
        self.model._apply(fn, recurse)
        device = next(self.model.parameters()).device
        self.routers.to(device)
        if self.forecasters is not None:
            self.forecasters.to(device)
        return self

    @contextmanager
    def unrouted(self) -> Iterator[nn.Module]:
        """The unmodified HF model for the block (the dense reference); routed again afterwards if it was routed
        before (a nested block leaves the outer one unrouted)."""
        routed = bool(self._hooks)
        self.unpatch()
        try:
            yield self.model
        finally:
            if routed:
                self.patch()

    def _start_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs.get("inputs_embeds")
        real = self.real_tokens
        if real is not None and real.shape == x.shape[:2]:
            real = real.to(torch.bool, copy=True)  # the meter keeps it: a caller may refill the tensor
        else:
            real = _tokens_from_mask(kwargs.get("attention_mask"), kwargs.get("cache"), *x.shape[:2], x.device)
        self.state = ForwardState(real, len(self.layers), router_share=policies.router_share(self.policy))
        self.state.real_keys = _real_keys(kwargs.get("attention_mask"), kwargs.get("cache"), x.shape[1])
        inference = not self.training_routers
        self._folds = self.routers.folds(self.config.threshold) if inference else None
        # The common inference case (the routers' argmax, no policy, no sampling) decides with one call per
        # module: the general path's dispatch measured 3x the decision's own 10 us in a decode step.
        self._argmax = self._folds if inference and self.policy is None and not self.sample else None
        self._sparse = inference and self.mode == "sparse"

    def _end_forward(self, module: nn.Module, args: tuple, output) -> None:
        if self.track and self.state is not None and self.state.complete:
            self.meter.add(self.state)

    # -- decisions ---------------------------------------------------------------------------------------

    @property
    def training_routers(self) -> bool:
        """Whether gates are straight-through Gumbel samples (routers in train mode, gradients on)."""
        return self.routers.training and torch.is_grad_enabled()

    def gate(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """Execute gate (batch, seq) for module `kind` of `layer`, given its router input x: float in {0, 1}
        with a straight-through gradient while routers train, a bool decision otherwise."""
        k = KIND_INDEX[kind]
        if self._argmax is not None:
            g = self._argmax[layer][k].executes(x)
        elif self.policy is not None:
            with torch.no_grad() if self._folds is not None else nullcontext():  # (a policy may run router layers)
                g = self.policy(layer, kind, x)
            if self._replay is not None and not self._replay.gates[layer][k].requires_grad:
                # Checkpointing recomputes the layer: the policy ran again, drawing from the restored global RNG as
                # its forward did, but its own generator (the random baseline's) is not replayed: the pass's stands.
                g = self._replay.gates[layer][k]
            elif self.training_routers:
                g = g.to(torch.float32)
            elif g.dtype != torch.bool:
                g = g > 0.5
        else:
            g = self.decide(self.routers.get(layer, kind), x, None if self._folds is None else self._folds[layer][k])
        self.state.gates[layer][k] = g  # on the routers' device, with every other gate, for the loss and the meter
        # routers sit on the first device of a model spread over several: the layer needs its gate on its own
        return g if g.device == x.device else g.to(x.device)

    def decide(self, router: Router, x: torch.Tensor, fold: Fold | None = None) -> torch.Tensor:
        """Gate from one router: a straight-through Gumbel sample while routers train, else a bool decision from
        its fold (`fold`: this pass's, from RouterBank.folds, when the caller has it), the argmax shifted by the
        threshold or with `sample` a Gumbel sample. gate's `_argmax` shortcut is the last line, taken directly."""
        if self.training_routers:
            return straight_through_gumbel(router(x), self.temperature, self.noise)
        fold = fold or router.fold(self.config.threshold)
        if self.sample:
            return sample_gate(fold.margin(x), self.config.threshold)
        return fold.executes(x)

    # -- user API ----------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def token_mask(self) -> torch.Tensor | None:
        """(B, T) bool: which tokens of the forward pass in progress (or the last one) are real."""
        return None if self.state is None else self.state.token_mask

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        """Checked as a loaded config is (NaN would skip every module, and the saved routers would not load)."""
        old, self.config.threshold = self.config.threshold, float(value)
        try:
            self.config.validate()
        except ConfigError:
            self.config.threshold = old
            raise

    @contextmanager
    def using(self, **settings) -> Iterator[RoutedModel]:
        """Change settings (mode, policy, sample, track, temperature, noise, real_tokens) for the block, then
        restore them."""
        unknown = sorted(set(settings) - set(self.SETTINGS))
        if unknown:
            raise ConfigError(f"unknown routing settings {unknown}; choose from {self.SETTINGS}")
        saved = {k: getattr(self, k) for k in settings}
        try:
            for key, value in settings.items():
                if key == "mode":
                    self.set_mode(value)
                elif key == "policy":
                    self.force(value)
                else:
                    setattr(self, key, value)
            yield self
        finally:
            for key, value in saved.items():
                setattr(self, key, value)

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
            policy = policies.from_masks(what)  # checks the (L, 2, B, T) form
            if what.shape[0] != len(self.layers):
                raise ConfigError(f"the decision mask covers {what.shape[0]} layers, the model has {len(self.layers)}")
            what = policy
        self.policy = what
        return self

    def forced(self, what: str | torch.Tensor | Policy | None):
        """force() for the block only."""
        return self.using(policy=what)

    def mode_as(self, mode: str):
        """set_mode() for the block only."""
        return self.using(mode=mode)

    def sparsity(self) -> SparsityReport:
        """Realised sparsity over all tokens since the last reset_sparsity()."""
        return self.meter.report()

    def reset_sparsity(self) -> None:
        self.meter.reset()

    @contextmanager
    def measuring(self) -> Iterator[SparsityMeter]:
        """Tracking on and a fresh sparsity meter for the block; the caller's `track` setting and meter (with what
        it has counted) come back afterwards, so an evaluation or analysis inside reports its own passes only and
        leaves the caller's statistics alone."""
        saved = self.meter
        self.meter = SparsityMeter(self.costs)
        try:
            with self.using(track=True):
                yield self.meter
        finally:
            self.meter = saved

    def realised_sparsity(self, accounting: str = "param") -> dict[str, torch.Tensor]:
        """Ratios of the last forward pass, differentiable through straight-through gates."""
        if accounting not in ACCOUNTINGS:
            raise ConfigError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
        if self.state is None or not self.state.complete:
            raise RuntimeError("no complete routed forward pass has run yet")
        r = ratios(self.state.totals(self.costs), self.costs)
        r["target_metric"] = r[accounting]
        return r

    def decisions(self) -> torch.Tensor:
        """Execute decisions of the last forward pass as a (L, 2, B, T) bool tensor."""
        if self.state is None:  # (an incomplete pass: stacked() says so)
            raise RuntimeError("no complete routed forward pass has run yet")
        return self.state.stacked()[0] > 0.5

    def router_parameters(self):
        return self.routers.parameters()

    def freeze_base(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)


def _real_keys(mask, cache, seq: int) -> torch.Tensor | None:
    """(B, T) real keys up to and including each token of the pass, from a 2-D padding mask over the cached and
    new tokens; None for any other mask (one covering only the new tokens says nothing about the cached ones)."""
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return None
    past = 0 if cache is None else int(cache.get_seq_length())
    if mask.shape[1] != past + seq:
        return None
    return mask.to(torch.int64).cumsum(-1)[:, past:]


def _tokens_from_mask(mask, cache, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """(B, T) bool: which tokens of the pass are real rather than padding, from the mask the decoder receives.

    Usually the 2-D padding mask. generate() with a static cache, or a caller, may hand over the prepared 4-D
    mask (B, 1, T, keys) instead, or a dict of them per attention type: there a token is real when it may
    attend to its own key, which sits after the keys already cached (a pad's key is masked for every query)."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next((m for m in mask.values() if m is not None), None))
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask[:, -seq:].to(torch.bool, copy=True)  # the meter keeps it: a caller may reuse the buffer
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        past = 0 if cache is None else int(cache.get_seq_length())
        if past + seq <= mask.shape[-1]:
            index = torch.arange(seq, device=mask.device)
            own = mask[:, 0, index, past + index]  # bool: may attend; float: an additive mask, 0 where it may
            return (own if own.dtype == torch.bool else own == 0).expand(batch, seq).to(device)
    return torch.ones(batch, seq, dtype=torch.bool, device=device)


def _forward_slot(layer: nn.Module) -> str:
    """Where a call of the layer ends up: accelerate's device hook (a device_map across devices) stores the forward
    it wraps in `_old_forward`; routing goes inside it, so the hook still moves inputs and weights first."""
    return "_old_forward" if hasattr(layer, "_hf_hook") and "_old_forward" in layer.__dict__ else "forward"


def _routed_slot(layer: nn.Module) -> str | None:
    """The instance attribute holding a RoutedModel's forward, if one does."""
    for slot in ("forward", "_old_forward"):
        f = layer.__dict__.get(slot)
        if isinstance(f, functools.partial) and f.func is _routed_layer_forward:
            return slot
    return None


# -- the routed decoder layer ------------------------------------------------------------------------------


def _routed_layer_forward(
    routed: RoutedModel, index: int, parts: LayerParts, signature: inspect.Signature, *args, **kwargs
) -> torch.Tensor:
    """Stands in for decoder layer `index`'s forward; takes the arguments the HF decoder passes."""
    if args[1:]:  # positional extras: name them as the layer's own forward would
        bound = signature.bind(parts.layer, *args, **kwargs)
        kwargs = dict(bound.arguments)
        kwargs.pop("self", None)
        kwargs.update(kwargs.pop("kwargs", {}))
        hidden = kwargs.pop("hidden_states")
    else:
        hidden = args[0] if args else kwargs.pop("hidden_states")
    if index == 0:
        pos = kwargs.get("position_ids")
        keys = routed.state.real_keys
        routed.state.context = keys if pos is None else (pos + 1 if keys is None else torch.minimum(pos + 1, keys))
    # skipgpt's switch, or HF's (gradient_checkpointing_enable() wraps the class's forward, which routing replaces);
    # checked only with gradients on, so inference pays nothing for it
    if torch.is_grad_enabled() and (routed.gradient_checkpointing or (
            getattr(parts.layer, "gradient_checkpointing", False) and parts.layer.training)):
        # Recompute the layer in backward; the saved RNG state replays the same Gumbel noise.
        # A KV cache would be appended to twice, so training under checkpointing runs without one.
        kwargs = {**kwargs, "cache": None, "use_cache": False}
        this_pass = {name: getattr(routed, name) for name in PASS_FIELDS}
        return checkpoint(_recomputable_layer, routed, this_pass, index, parts, hidden, kwargs, use_reentrant=False)
    return _layer(routed, index, parts, hidden, kwargs)


# What a layer recomputed by checkpointing must see as its forward did: its pass, and the settings that decide.
PASS_FIELDS = ("state", "_folds", "_argmax", "_sparse", "policy", "sample", "temperature", "noise")


def _recomputable_layer(routed: RoutedModel, this_pass: dict, index: int, parts: LayerParts, hidden: torch.Tensor,
                        kwargs: dict) -> torch.Tensor:
    """_layer under checkpointing: run in the forward pass, and again in backward. By then other passes may have run
    (gradient accumulation) and settings may have changed (`using`), so the second run goes back to its own pass
    and settings; the restored RNG state then draws every sample again as the forward did."""
    if this_pass["state"].gates[index][0] is None:  # the forward pass itself
        return _layer(routed, index, parts, hidden, kwargs)
    live = {name: getattr(routed, name) for name in (*PASS_FIELDS, "_replay")}
    for name, value in this_pass.items():
        setattr(routed, name, value)
    routed._replay = this_pass["state"]
    try:
        return _layer(routed, index, parts, hidden, kwargs)
    finally:
        for name, value in live.items():
            setattr(routed, name, value)


def _layer(routed: RoutedModel, index: int, parts: LayerParts, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer: route, then attention and MLP, each either gated (masked) or gathered (sparse)."""
    is_sparse = routed._sparse
    fc = routed.forecasters
    x = hidden
    g = routed.gate(index, "attn", x)
    if is_sparse:
        y = sparse_attention(parts, x, g, kwargs)
        x = y if fc is None else _add_forecast(y, fc.attn[index], parts.attn_norm, x, g)
    else:
        xn = parts.attn_norm(x)
        x = gated(x, run_attention(parts, xn, kwargs), g, None if fc is None else fc.attn[index](xn))
    g = routed.gate(index, "mlp", x if routed.config.router_input == "module" else hidden)
    if is_sparse:
        y = sparse_mlp(parts, x, g)
        return y if fc is None else _add_forecast(y, fc.mlp[index], parts.mlp_norm, x, g)
    xn = parts.mlp_norm(x)
    # masked: every token's forecast, kept where the module is skipped
    return gated(x, run_mlp(parts, xn), g, None if fc is None else fc.mlp[index](xn))


def _add_forecast(y: torch.Tensor, forecaster: Forecaster, norm: nn.Module, x: torch.Tensor, g: torch.Tensor
                  ) -> torch.Tensor:
    """Sparse mode: y plus the forecast of the module output for the rows that skipped it (input x, bool gate g)."""
    rows = (~g.reshape(-1)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return y
    flat = x.reshape(-1, x.shape[-1]).index_select(0, rows)
    return y.reshape(-1, y.shape[-1]).index_add(0, rows, forecaster(norm(flat)).to(y.dtype)).view_as(y)
