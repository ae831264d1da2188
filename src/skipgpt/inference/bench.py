"""Speed measurement shared by `skipgpt bench`, benchmarks/speed.py and the demo.

Three variants of the same weights are timed side by side:
- dense:  the unmodified HF model (the routed layer forwards are detached for the run);
- masked: routing with every module computed and multiplied by its gate (training semantics);
- sparse: routing that computes only executing tokens (skipgpt.models.sparse).
Prefill is the prompt's forward as `generate()` runs it: one pass over (batch, seq_len) tokens that
fills a KV cache and keeps the logits of the last position only (logits_to_keep=1); decode is
`decode_tokens` greedy steps of one token per sequence from that cache.

A warm-up round runs the variants one after another; it also gives each variant's peak memory and the
sparse run's statistics (the timed rounds see the same input and run with the sparsity meter off, so that
its queued statistics are never summed inside a timed turn). Each timed round then prefills the three in
turn (order rotated every round) and decodes their three caches in turns of DECODE_TURN steps, so a drift
of the machine's speed within a round slows all three alike (on a 2-core VM, with each variant decoding its
whole run at once, the per-round masked/dense decode ratios spanned 0.78-1.02 between quartiles). Speedups
are medians of the per-round ratios (a variant against the dense run of the same round), with their first
and third quartiles; tokens/s are medians over rounds.
The ideal speedup is the FLOP ratio of the whole forward, LM head included (for the positions whose logits are
kept), under this project's semantics (a skipped attention still computes its keys and values):
total / (total - skipped), the saving net of the routers' FLOPs.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch
from transformers import DynamicCache

from ..models.adapters import unwrap
from ..routing import policies
from ..routing.sparsity import report

VARIANTS = ("dense", "masked", "sparse")
DECODE_TURN = 8  # decode steps a variant runs before the next one takes its turn


def skip_fraction_policy(num_layers: int, fraction: float, seed: int = 0) -> policies.Policy | None:
    """Stand-in for trained routers: every token skips every module with probability `fraction`.

    A uniform rate per module makes the parameter sparsity equal `fraction`. None at 0: the routers'
    own zero-initialised "execute everything" decision is used, so the overhead measured includes them.
    """
    if fraction <= 0:
        return None
    return policies.random(torch.full((num_layers, 2), float(fraction)), seed=seed)


def random_ids(model: torch.nn.Module, tokenizer_or_vocab, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """(batch_size, seq_len) random token ids on the model's device, below both the vocabulary size (a tokenizer's
    or an int) and the embedding's row count (a tokenizer may count more tokens than the model embeds)."""
    vocab = tokenizer_or_vocab if isinstance(tokenizer_or_vocab, int) else len(tokenizer_or_vocab)
    vocab = min(vocab, unwrap(model).get_input_embeddings().num_embeddings)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(next(model.parameters()).device)


def _variant(routed, variant: str, policy: policies.Policy | None):
    """Run the wrapped model as `variant` under `policy` (None: the routers, or the caller's forced policy)."""
    if variant == "dense":
        return routed.unrouted()
    if policy is None:
        return routed.using(mode=variant)
    return routed.using(mode=variant, policy=policy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model, ids: torch.Tensor):
    cache = DynamicCache(config=unwrap(model).config)
    # generate() asks for the last position's logits only: the LM head over all 512 positions of SmolLM2 is
    # a sixth of a dense prefill's time, work that no routing saves and no generation does
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1), cache


def _decode(model, token: torch.Tensor, cache, steps: int) -> torch.Tensor:
    for _ in range(steps):
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return token


def _peak_memory(device: torch.device) -> float:
    """Peak memory in MiB: allocator peak on CUDA (per variant), process peak RSS on CPU (all variants)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ideal(totals: dict | None, head: float) -> tuple[float, float]:
    """(FLOP sparsity of the whole forward, ideal speedup) from the meter's summed totals and the LM head's FLOPs."""
    if totals is None:
        return 0.0, 1.0
    total = float(totals["flop_total"]) + head
    skipped = float(totals["flop_skipped"])
    return skipped / total, total / max(total - skipped, 1e-9)


@torch.no_grad()
def measure_speed(
    routed,
    tokenizer_or_vocab,
    seq_len: int = 512,
    batch_size: int = 4,
    decode_tokens: int = 32,
    repeats: int = 5,
    sparsity: float | None = None,
    seed: int = 0,
) -> dict:
    """Prefill and decode throughput of dense HF, masked and sparse routing, side by side.

    routed:             a RoutedModel; its routers decide unless `sparsity` is given.
    tokenizer_or_vocab: a tokenizer (its vocabulary size is used) or the vocabulary size; inputs are
                        random token ids, so routing sees the same tokens in every variant.
    sparsity:           None = use the routers (a saved random baseline restarts from its seed in every
                        variant and round); a fraction = every module skips that fraction of tokens at
                        random (the stand-in for untrained routers; 0 = routers, all execute).
    Returns the JSON-able dict of `skipgpt bench`, less the keys the command adds (speedup = median over rounds
    of dense time / sparse time).
    """
    hf = unwrap(routed.model)
    ids = random_ids(hf, tokenizer_or_vocab, batch_size, seq_len, seed)
    device = ids.device
    layers = len(routed.layers)
    head_flops = 2.0 * hf.config.hidden_size * hf.get_output_embeddings().weight.shape[0]

    def fresh() -> policies.Policy | None:
        """Random routing restarts from its seed for every variant and round, so masked and sparse decide alike:
        the `sparsity` stand-in, or a saved `routing: random` baseline rebuilt from its config (its loaded
        policy would carry one generator on from pass to pass). None: the routers or the caller's policy."""
        if sparsity is not None:
            return skip_fraction_policy(layers, sparsity, seed)
        if routed.config.extra.get("routing") == "random":
            return policies.from_extra(routed)
        return None

    memory, totals = {}, {}
    with routed.measuring():  # the statistics of the warm-up, on a meter of its own
        for variant in VARIANTS:  # warm-up, one variant at a time
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with _variant(routed, variant, fresh()):
                routed.reset_sparsity()
                token, cache = _prefill(routed.model, ids)
                prefill_totals = routed.meter.totals
                routed.reset_sparsity()
                _decode(routed.model, token, cache, decode_tokens)
                _sync(device)
                del cache
            memory[variant] = _peak_memory(device)
            if variant == "sparse":
                totals = {"prefill": prefill_totals, "decode": routed.meter.totals}

    turns = [DECODE_TURN] * (decode_tokens // DECODE_TURN)
    if decode_tokens % DECODE_TURN:
        turns.append(decode_tokens % DECODE_TURN)
    times = {v: {"prefill": [], "decode": []} for v in VARIANTS}
    with routed.using(track=False):  # no queued statistics summed inside a timed turn
        for rep in range(repeats):
            order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]
            policy = {v: fresh() for v in order}
            state, decode_s = {}, dict.fromkeys(order, 0.0)
            for variant in order:
                with _variant(routed, variant, policy[variant]):
                    _sync(device)
                    tic = time.perf_counter()
                    state[variant] = _prefill(routed.model, ids)
                    _sync(device)
                    times[variant]["prefill"].append(time.perf_counter() - tic)
            for steps in turns:
                for variant in order:
                    token, cache = state[variant]
                    with _variant(routed, variant, policy[variant]):
                        tic = time.perf_counter()
                        token = _decode(routed.model, token, cache, steps)
                        _sync(device)
                        decode_s[variant] += time.perf_counter() - tic
                    state[variant] = (token, cache)
            for variant in order:
                times[variant]["decode"].append(decode_s[variant])
            del state

    def tok_s(variant: str, phase: str) -> float:
        n = batch_size * (seq_len if phase == "prefill" else decode_tokens)
        return n / statistics.median(times[variant][phase])

    def ratios(variant: str, phase: str) -> list[float]:
        """Per round, dense time / variant time, both from the same round."""
        return [d / t for d, t in zip(times["dense"][phase], times[variant][phase])]

    def quartiles(values: list[float]) -> list[float]:
        """First and third quartile (on a shared CPU the rounds spread by 10-20%, so a median needs its spread);
        with 3 rounds the slowest and the fastest, with fewer the range (the quartiles would extrapolate)."""
        if len(values) < 3:
            return [min(values), max(values)]
        first, _, third = statistics.quantiles(values)
        return [first, third]

    result = {"device": _device_name(device), "dtype": str(next(hf.parameters()).dtype).replace("torch.", "")}
    for phase in ("prefill", "decode"):
        # the head runs once per row in prefill (the last position's logits), once per row and step in decode
        head_positions = batch_size * (1 if phase == "prefill" else decode_tokens)
        flop_sparsity, ideal = _ideal(totals[phase], head_flops * head_positions)
        dense, masked, sparse = (tok_s(v, phase) for v in VARIANTS)
        sparse_ratios, masked_ratios = ratios("sparse", phase), ratios("masked", phase)
        result[phase] = {
            "dense_tok_s": dense,
            "masked_tok_s": masked,
            "sparse_tok_s": sparse,
            "speedup": statistics.median(sparse_ratios),
            "speedup_quartiles": quartiles(sparse_ratios),
            "masked_speedup": statistics.median(masked_ratios),
            "masked_speedup_quartiles": quartiles(masked_ratios),
            "ideal_speedup": ideal,
            "flop_sparsity": flop_sparsity,
            "dense_s": statistics.median(times["dense"][phase]),
            "sparse_s": statistics.median(times["sparse"][phase]),
            "rounds_s": {v: times[v][phase] for v in VARIANTS},
        }
    # parameter/attention/MLP sparsity of the prefill (the decode steps are reported in decode_sparsity)
    prefill_report = _report(routed, totals["prefill"])
    result["sparsity"] = prefill_report
    result["decode_sparsity"] = _report(routed, totals["decode"])
    result["peak_memory_mib"] = memory
    result["peak_memory_note"] = (
        "CUDA allocator peak per variant (warm-up round)" if device.type == "cuda"
        else "process peak RSS (all variants so far)"
    )
    result["shape"] = {"seq_len": seq_len, "batch_size": batch_size, "decode_tokens": decode_tokens,
                       "repeats": repeats, "threads": torch.get_num_threads()}
    result["routing"] = "routers" if sparsity is None else f"random per-token skip of {100 * sparsity:g}% per module"
    return result


# What a batch-1 measurement adds to the batch-N result (the rest, device and dtype, is shared).
BATCH_1_KEYS = ("prefill", "decode", "sparsity", "decode_sparsity", "peak_memory_mib", "shape")


def measure_speed_batches(routed, tokenizer_or_vocab, batch_size: int = 4, **options) -> dict:
    """measure_speed at `batch_size` (its keys at the top level) and at batch 1 (the same keys under "batch_1").

    Batch 1 is what one chat user sees: a module the token skips is not computed at all. At batch N a
    decode step skips a module's weight reads only when every row skips it, so the two can differ a lot.
    The batch-1 prompt is the first row of the batch-N one (same seed). batch_size 1 is measured once.
    `options` are measure_speed's other keyword arguments (seq_len, decode_tokens, repeats, sparsity, seed).
    """
    result = measure_speed(routed, tokenizer_or_vocab, batch_size=batch_size, **options)
    one = result if batch_size == 1 else measure_speed(routed, tokenizer_or_vocab, batch_size=1, **options)
    result["batch_1"] = {key: one[key] for key in BATCH_1_KEYS}
    return result


def _report(routed, totals) -> dict[str, float]:
    r = report(totals, routed.costs)
    return {"param": r.param, "attention": r.attention, "mlp": r.mlp, "flop": r.flop}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
