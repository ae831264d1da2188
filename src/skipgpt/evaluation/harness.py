"""lm-evaluation-harness integration: the `skipgpt` model and stock tasks that read local data.

`SkipGPTLM` is the harness's own HFLM around a model whose routers (and LoRA) are applied, so the
harness's request building, batching and acc/acc_norm scoring are used unchanged. It is registered
with the harness as `skipgpt` when this module is imported, and lazily in every interpreter by the
installed `skipgpt-lm-eval.pth` (src/_skipgpt_lm_eval.py), so a plain `lm_eval --model skipgpt` works;
`python -m skipgpt.evaluation.harness` is the harness's command line with it registered explicitly:

    python -m skipgpt.evaluation.harness run --model skipgpt \\
        --model_args pretrained=smollm2-135m,routers=out/routers --tasks piqa --device cpu

Local data: `build_task` loads the stock task YAML shipped with the harness (prompt, choices, target,
metrics) and swaps its dataset for the items read by skipgpt.evaluation.tasks.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import lm_eval.api.model
import lm_eval.api.task
import lm_eval.models.huggingface
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..artifact import apply_adapter, load_adapter, load_routers
from ..errors import ConfigError, DataError, SkipGPTError
from ..models.loading import load_model
from ..models.routed import RoutedModel
from .tasks import PAPER_METRIC as PAPER_METRIC  # noqa: F401 - kept importable from here
from .tasks import TaskData

# Stock task YAML of each task, relative to lm_eval/tasks.
STOCK_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
# HFLM options that still act on a model instance with a tokenizer object: SkipGPTLM passes these on and
# refuses any other model_arg, since HFLM would drop it (a typo of routers=, peft=) or assert on it
# (parallelize=). trust_remote_code is what `lm_eval run --trust_remote_code` adds for the datasets.
HFLM_OPTIONS = frozenset({
    "batch_size", "max_batch_size", "max_length", "truncation", "logits_cache", "softmax_dtype",
    "mixed_precision_dtype", "add_bos_token", "prefix_token_id", "trust_remote_code", "use_fast_tokenizer",
    "think_end_token", "enable_thinking", "chat_template_args",
})
OWN_ARGS = ("pretrained", "routers", "lora", "mode", "dtype", "device", "tokenizer")


def prepare_model(
    pretrained: str, routers: str | None = None, lora: str | None = None, mode: str = "masked",
    dtype: str = "float32", device: str | None = None,
):
    """(routed or plain HF model, tokenizer): load the base, then everything the router directory holds
    (routers, a baseline's policy, a stage-2 adapter, see skipgpt.load_routers); `lora` merges an
    adapter kept elsewhere."""
    if mode == "sparse" and not routers:
        raise ConfigError("--mode sparse needs --routers (a dense model has nothing to skip)")
    model, tokenizer = load_model(pretrained, dtype=dtype, device=device)
    if not routers:
        return (load_adapter(model, lora) if lora else model), tokenizer
    routed = load_routers(model, routers)  # applies routers/adapter (the same as --lora DIR/adapter)
    own = routed.adapter
    if lora and own is not None and Path(lora).resolve() != own.resolve():
        raise ConfigError(f"{routers} holds its own stage-2 adapter ({own}); drop --lora {lora}")
    if lora and own is None:
        apply_adapter(routed, lora)
    routed.set_mode(mode)
    return routed, tokenizer


def _real_tokens(inps: torch.Tensor) -> torch.Tensor:
    """Guess of the non-pad tokens in a batch the harness right-padded with id 0.

    The harness does not pass a mask to causal models; its padding is a run of zeros after each row,
    and one row is never padded. A row whose own last token is id 0 is counted one token short. The
    guess goes only to the routed model's token mask, never to attention: it touches the sparsity
    statistics, never the scores (save through a policy that reads the mask: an uncalibrated MoD-D top-k).
    """
    zero = inps == 0
    trailing = zero.flip(-1).int().cumprod(-1).sum(-1)  # length of each row's final run of zeros
    length = inps.shape[1] - trailing
    return torch.arange(inps.shape[1], device=inps.device)[None, :] < length[:, None]


def _device(device: str | None) -> str | None:
    """HFLM's fallback: `lm_eval run` passes cuda:0 unless told otherwise, and the stock hf model then runs
    on the CPU of a machine without CUDA rather than failing."""
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("CUDA is not available: running on the CPU instead of %s", device)
        return "cpu"
    return device


class SkipGPTLM(HFLM):
    """HFLM over a SkipGPT model. model_args: pretrained, routers, lora, mode (masked|sparse), dtype, device,
    and the HFLM options in HFLM_OPTIONS."""

    def __init__(
        self, pretrained="smollm2-135m", routers: str | None = None, lora: str | None = None,
        mode: str = "masked", dtype: str = "float32", tokenizer=None, device: str | None = "cpu", **kwargs,
    ) -> None:
        unknown = sorted(set(kwargs) - HFLM_OPTIONS)
        if unknown:
            raise ConfigError(
                f"unknown model_args {', '.join(map(repr, unknown))} for the skipgpt model; it takes "
                f"{', '.join(OWN_ARGS)} and the HFLM options {', '.join(sorted(HFLM_OPTIONS))}"
            )
        # lm-eval parses `routers=1` into the int 1; every name here is a path or hub id.
        if isinstance(pretrained, (int, float)):
            pretrained = str(pretrained)
        routers = None if routers is None else str(routers)
        lora = None if lora is None else str(lora)
        if isinstance(pretrained, str):
            pretrained, tok = prepare_model(pretrained, routers, lora, mode, dtype, _device(device))
            tokenizer = tokenizer or tok
        elif routers or lora:
            raise ConfigError("routers= and lora= apply only when pretrained= names a model to load")
        if tokenizer is None:
            raise ConfigError("a model instance needs its tokenizer (tokenizer=...)")
        self.routed = pretrained if isinstance(pretrained, RoutedModel) else None
        model = self.routed.model if self.routed is not None else pretrained
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.routed is None or attn_mask is not None or inps.shape[0] == 1:
            return super()._model_call(inps, attn_mask, labels)
        # The forward has no pad mask, as in stock HFLM: under causal attention right pads never reach a real
        # token, while a mask would hide a real id-0 token from its own query. The guessed pads only leave the
        # sparsity statistics.
        with self.routed.using(real_tokens=_real_tokens(inps)):
            return super()._model_call(inps)


def stock_config(name: str) -> dict:
    """The harness's own task config (YAML with !function hooks resolved)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / STOCK_YAML[name], resolve_func=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    metrics = [m["metric"] for m in config.get("metric_list") or []]
    if "acc_norm" not in metrics and name != "winogrande":
        # BoolQ's stock config lists acc only; acc_norm comes from the same log-likelihoods.
        config["metric_list"] = list(config["metric_list"]) + [
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
        ]
    return config


def build_task(data: TaskData | None, name: str | None = None):
    """A harness task with the stock prompt and metrics over `data`'s items (None: the hub dataset)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    name = data.name if data is not None else name
    config = stock_config(name)
    if data is None:
        try:
            return ConfigurableTask(config=config)
        except Exception as e:  # network or hub errors surface as many types
            why = type(e).__name__
            raise DataError(f"{name}: no PATH given and the hub dataset could not be loaded ({why})") from None
    docs = data.docs
    if data.format == "llamacpp":
        # The text file's first line is the prompt, "activity_label: ctx", scored as written (see tasks.py).
        config.update(process_docs=None, doc_to_text="{{query}}", doc_to_choice="choices", doc_to_target="{{label}}")
    dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
    config.update(
        custom_dataset=lambda **_: dataset, dataset_path=None, dataset_name=None, dataset_kwargs=None,
        training_split=None, validation_split=None, test_split="test", fewshot_split=None,
        metadata={**(config.get("metadata") or {}), "skipgpt_source": data.source},
    )
    harness_logger = logging.getLogger("lm_eval")
    level = harness_logger.level
    harness_logger.setLevel(logging.ERROR)  # silence the custom-dataset notice
    try:
        return ConfigurableTask(config=config)
    finally:
        harness_logger.setLevel(level)


# The harness modules whose progress bars no argument of evaluate() turns off (request building, tokenising,
# scoring): each imports tqdm by name.
HARNESS_BAR_MODULES = (lm_eval.api.task, lm_eval.api.model, lm_eval.models.huggingface)


def _no_bar(*args, **kwargs) -> tqdm:
    return tqdm(*args, **{**kwargs, "disable": True})  # over the caller's own disable=, which a partial would keep


@contextmanager
def quiet_bars() -> Iterator[None]:
    """No progress bars from the harness or datasets in the block (what --no-progress promises): datasets has a
    switch; the harness modules get a disabled tqdm meanwhile. Both are restored afterwards."""
    was_on = datasets.is_progress_bar_enabled()
    saved = [module.tqdm for module in HARNESS_BAR_MODULES]
    datasets.disable_progress_bars()
    for module in HARNESS_BAR_MODULES:
        module.tqdm = _no_bar
    try:
        yield
    finally:
        for module, bar in zip(HARNESS_BAR_MODULES, saved):
            module.tqdm = bar
        if was_on:
            datasets.enable_progress_bars()


def run_task(lm: HFLM, task, limit: int | None = None, log_samples: bool = False) -> dict:
    """Score one harness task; returns {n, acc, acc_norm} (plus samples when asked)."""
    from lm_eval.evaluator import evaluate

    name = task.config.task
    results = evaluate(lm, {name: task}, limit=limit, bootstrap_iters=0, log_samples=log_samples, verbosity="ERROR")
    row = results["results"][name]
    out = {
        "n": int(results["n-samples"][name]["effective"]),
        "acc": float(row["acc,none"]),
        "acc_norm": float(row["acc_norm,none"]) if "acc_norm,none" in row else None,
    }
    if log_samples:
        out["samples"] = results["samples"][name]
    return out


def main(argv: list[str] | None = None) -> None:
    """The harness's command line, with the `skipgpt` model registered. skipgpt's own refusals (a routers= folder
    that is not one, an unknown model_args key) are one line and exit status 2, as from `skipgpt`."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except SkipGPTError as e:
        print(f"skipgpt-lm-eval: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run as `python -m`, this file is a second copy named __main__; the registry keeps the entry for the class
    # of the real module (the lazy one the .pth shim adds names it), so the command line runs from there.
    from skipgpt.evaluation.harness import main as harness_main

    harness_main()
else:
    register_model("skipgpt")(SkipGPTLM)
