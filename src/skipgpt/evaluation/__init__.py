"""Evaluation as the paper does it: zero-shot multiple choice through lm-evaluation-harness, and
perplexity on WikiText-2 / PTB over non-overlapping windows, with realised sparsity per task.

Heavy imports (lm-eval, datasets) happen only when `evaluate` or the harness module is used.
"""

from .perplexity import perplexity
from .tasks import MC_TASKS, PPL_TASKS, TASKS, load_perplexity_text, load_task


def evaluate(*args, **kwargs) -> dict:
    from .runner import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


evaluate.__doc__ = "See skipgpt.evaluation.runner.evaluate."

__all__ = ["MC_TASKS", "PPL_TASKS", "TASKS", "evaluate", "load_perplexity_text", "load_task", "perplexity"]
