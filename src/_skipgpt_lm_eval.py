"""Registers the `skipgpt` model with lm-evaluation-harness, so `lm_eval --model skipgpt` works.

lm-eval 0.4.13 discovers models only through its own registry and reads no plugin entry points. The
`skipgpt-lm-eval.pth` file installed with skipgpt imports this module at interpreter start. It must
stay cheap: it imports nothing heavy, only waits for `lm_eval.models` (which lm-eval imports to fill
its registry) and then adds a lazy entry, so skipgpt itself is imported only when the model is used.
"""

import importlib.abc
import importlib.machinery
import sys

WATCHED = "lm_eval.models"
TARGET = "skipgpt.evaluation.harness:SkipGPTLM"


def _register() -> None:
    try:
        from lm_eval.api.registry import model_registry

        if model_registry.get("skipgpt", None) is None:
            model_registry.register("skipgpt", target=TARGET)
    except Exception:  # noqa: BLE001 - another lm-eval version: never break the interpreter or lm-eval
        pass


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _register()

    def __getattr__(self, name):
        # everything else (resource readers, get_data, is_package, ...) is the real loader's
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if WATCHED in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
