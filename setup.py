"""Only adds skipgpt-lm-eval.pth to the installed files; all metadata is in pyproject.toml.

A .pth file must sit at the top of site-packages, which package data cannot reach: the regular
build copies it there, and an editable install writes it into its wheel next to setuptools' own.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "skipgpt-lm-eval.pth"
SOURCE = Path(__file__).parent / "src" / PTH


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(SOURCE), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


commands = {"build_py": BuildPyWithPth}

try:  # setuptools' editable strategy is not public API: without it, editable installs skip the .pth
    from setuptools.command.editable_wheel import editable_wheel

    class _WithPth:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __call__(self, wheel, files, mapping) -> None:
            self.inner(wheel, files, mapping)
            wheel.writestr(PTH, SOURCE.read_text(encoding="utf-8"))

    class EditableWheelWithPth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _WithPth(super()._select_strategy(*args, **kwargs))

    if hasattr(editable_wheel, "_select_strategy"):
        commands["editable_wheel"] = EditableWheelWithPth
except ImportError:
    pass

setup(cmdclass=commands)
