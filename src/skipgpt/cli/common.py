"""What the subcommands share, declared once.

- Each command's parser, named and documented by its module's docstring (`add_command`).
- Flags built from config dataclass fields (`add_field_flag`): type from the field's annotation, choices
  and help from its metadata. `skipgpt train` builds every flag this way; the other commands build their
  --model and --dtype from the same TrainConfig fields (`add_model_flags`).
- --device and --threads (`add_model_flags`) and what they do at run time (`model_options`).
- --routers (`add_routers`; each command words its own help), --task/--limit/--windows (`add_task_flags`)
  and the tasks --task names, read before a model loads (`parse_tasks`), --no-progress (`add_no_progress`).
- --output (`add_output`; each command checks it with skipgpt.io.check_output before any work), and
  results written so that a late failure does not lose them (`write_results`).
- argparse types that refuse a bad value at parse time (`positive_int`, `int_at_least`, `sparsity`,
  `checked`) or expand one (`user_path`), and `Parser`, whose errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..artifact import ADAPTER_DIR, CONFIG_NAME, FORECASTERS_NAME, WEIGHTS_NAME
from ..config import check_sparsity
from ..errors import ConfigError
from ..evaluation.tasks import PPL_TASKS, TASKS, load_perplexity_text, load_task
from ..io import expand_user, write_json_atomic
from ..training.config import TrainConfig

FIELD_DEFAULT: Any = dataclasses.MISSING  # add_field_flag(default=...): the field's own default


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr ("skipgpt bench: error: ..."), exit status 2.

    Subcommand parsers are made of the same class, so every command reports its errors alike."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_command(sub: argparse._SubParsersAction, doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one command, from its module's docstring.

    The docstring opens with "`skipgpt NAME`: HELP" (HELP is the line `skipgpt --help` shows); the
    paragraphs after it are the command's description. An epilog laid out in lines (examples, lists of
    tasks) is printed as written, a one-paragraph epilog is wrapped like the description."""
    head, _, description = inspect.cleandoc(doc).partition("\n\n")
    title, _, summary = " ".join(head.split()).partition(": ")
    name = title.strip("`").split()[-1]
    raw = epilog is not None and "\n" in epilog
    return sub.add_parser(name, help=summary, description=description.strip() or summary, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)


# -- argparse types ---------------------------------------------------------------------------------------


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number >= minimum (and <= maximum) (else argparse's one-line error, exit status 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = "int" if minimum == 1 else f"int >= {minimum}"
    return parse


positive_int = int_at_least(1)


def checked(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type from a converter that raises ConfigError: its message becomes argparse's one-line error."""

    @functools.wraps(convert)
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def parse_sparsity(text: str) -> float:
    """A sparsity fraction in [0, 1), e.g. "0.25"; ConfigError otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number (use a fraction such as 0.25)") from None
    return check_sparsity(value, "sparsity")


sparsity = checked(parse_sparsity)


def comma_list(text: str) -> list[str]:
    """argparse type of a list[str] field: "q_proj, v_proj" -> ["q_proj", "v_proj"]."""
    return [part.strip() for part in text.split(",") if part.strip()]


# -- flags from dataclass fields -------------------------------------------------------------------------


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def field_type(hint: Any) -> Callable[[str], Any]:
    """The argparse type a field annotation asks for: int, float, str, bool; X | None as X; list[str]."""
    if hint in (int, float, str, bool):
        return hint
    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return field_type(args[0])
    if origin is list and args == [str]:
        return comma_list
    raise TypeError(f"no command-line type for a field annotated {hint!r}")


def add_field_flag(parser: argparse.ArgumentParser, cls: type, name: str, default: Any = FIELD_DEFAULT,
                   shown: str | None = None, note: str | None = None, *, type: Callable[[str], Any] | None = None,
                   help: str | None = None) -> argparse.Action:
    """--NAME (underscores as dashes) for field `name` of dataclass `cls`.

    The type comes from the annotation (a bool field is --NAME/--no-NAME), the choices and the help from
    the field's metadata ({"help": ..., "choices": ...}); the help ends with the field's default (or
    `shown`), `note` is added to it. `default` is the flag's value when it is not given: the field's
    default unless told otherwise (`skipgpt train` passes None, so that --config FILE can fill it).
    `type` replaces the annotation's type where a command refuses more at parse time (positive_int), `help`
    the field's help where the command uses the value differently."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    kind = type or field_type(typing.get_type_hints(cls)[name])
    value = field_default(f)
    default = value if default is FIELD_DEFAULT else default
    text = (help or f.metadata["help"]) + (f"; {note}" if note else "")
    if "(default" not in text:
        text += f" (default: {shown or (','.join(value) if isinstance(value, list) else value)})"
    flag = "--" + name.replace("_", "-")
    text = text.replace("%", "%%")
    if kind is bool:
        return parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default,
                                   help=text)
    return parser.add_argument(flag, dest=name, type=kind, default=default, choices=f.metadata.get("choices"),
                               help=text)


# -- the shared flags -------------------------------------------------------------------------------------


def add_model_flags(parser: argparse.ArgumentParser, *, note: str | None = None, dtype: bool = True,
                    dtype_default: Any = FIELD_DEFAULT, dtype_note: str | None = None, device: str | None = None,
                    threads: bool = False) -> None:
    """--model and (unless dtype=False) --dtype, from TrainConfig's fields; --device and --threads on request.

    dtype_default=None leaves --dtype unset so that model_options picks it by device (bfloat16 on cuda,
    float32 on cpu). device: None = no --device flag; "auto" = default cuda when available, else cpu;
    "cpu" = default cpu. model_options(args) applies all of them."""
    add_field_flag(parser, TrainConfig, "model", note=note)
    if dtype:
        add_field_flag(parser, TrainConfig, "dtype", default=dtype_default, note=dtype_note,
                       shown="bfloat16 on cuda, float32 on cpu" if dtype_default is None else None)
    if device is not None:
        shown = "cuda if available, else cpu" if device == "auto" else device
        parser.add_argument("--device", default=None, help=f"torch device: cpu, cuda or cuda:N (default: {shown})")
        parser.set_defaults(device_default=device)
    if threads:
        # far more threads than any machine has cores is a typo (torch 2.13's CPU index_add crashed at 2,047)
        parser.add_argument("--threads", type=int_at_least(1, 1024), default=None,
                            help="CPU threads for torch (default: torch's choice)")


def add_routers(parser: argparse.ArgumentParser, help: str, required: bool = False) -> argparse.Action:
    """--routers DIR: a run directory of `skipgpt train` (or a baseline's); each command says what it does with it."""
    return parser.add_argument("--routers", type=user_path, required=required, default=None, help=help)




def add_task_flags(parser: argparse.ArgumentParser) -> None:
    """--task NAME[=PATH] (repeatable, required), --limit and --windows: what `eval` and `compare` evaluate on.
    parse_tasks(args.task) reads and checks the data."""
    parser.add_argument("--task", action="append", required=True, metavar="NAME[=PATH]",
                        help="a task and where its data is; repeat for several tasks (see the list below)")
    parser.add_argument("--limit", type=positive_int, default=None, help="quick run: first N items of each "
                        "multiple-choice task, first N windows of a perplexity task")
    parser.add_argument("--windows", type=positive_int, default=None,
                        help="first N windows of a perplexity task, whatever --limit says (default: --limit)")


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")


def user_path(text: str) -> str:
    """argparse type of a path the command reads or writes: "~" expanded here, so that the checks before the work
    and the reads or writes after it see the same place (a quoted "~/x" would otherwise become a folder named "~");
    an empty one (an unset $VAR) refused, where it would read as the flag left out or as the working folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset variable?): name a file or folder")
    return os.path.expanduser(text)


def add_output(parser: argparse.ArgumentParser, help: str, required: bool = False,
               default: str | None = None) -> argparse.Action:
    """--output: a required one, or one with a default (None = not written)."""
    if required:
        return parser.add_argument("--output", type=user_path, required=True, help=help)
    shown = f" (default: {default})" if default is not None else ""
    return parser.add_argument("--output", type=user_path, default=default, help=help + shown)


# -- what the shared flags do -----------------------------------------------------------------------------


def apply_threads(args: argparse.Namespace) -> None:
    """--threads N: torch uses N CPU threads (without it, torch's own choice)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def resolve_device(args: argparse.Namespace) -> str | None:
    """The device --device asks for (None = the model stays where it loads, on the cpu).

    Without --device, "auto" commands take cuda when it is there. A device that torch does not know or
    that this machine lacks (cuda on a CPU-only build, cuda:3 on one GPU) is a ConfigError (one line),
    not a torch traceback later."""
    device = getattr(args, "device", None)
    if device is None and getattr(args, "device_default", None) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise ConfigError(f"--device {device} was asked for but no {parsed.type.upper()} device is available")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} {parsed.type} device(s), "
                          f"numbered from 0")
    return device


def resolve_dtype(args: argparse.Namespace, device: str | None) -> str:
    """--dtype, or without it bfloat16 on cuda and float32 elsewhere."""
    if getattr(args, "dtype", None) is not None:
        return args.dtype
    return "bfloat16" if device is not None and device.startswith("cuda") else "float32"


def parse_tasks(specs: list[str]) -> dict[str, str | None]:
    """--task NAME[=PATH] specs -> {name: path or None}; an unknown task, a path that holds no data for it or
    a malformed item fails here, before a model loads."""
    tasks: dict[str, str | None] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        name = name.strip()
        if eq and not path.strip():  # without a path the task comes from the hub: a slip must not mean that
            raise ConfigError(f"--task {spec}: the path after = is empty; give the data's path, or --task {name} "
                              "alone for the Hugging Face hub")
        if name not in TASKS:
            raise ConfigError(f"--task {spec}: unknown task {name!r}; known tasks: {' '.join(TASKS)}")
        if name in tasks:
            raise ConfigError(f"--task {name} given twice")
        if path:
            # Reading every item now takes well under a second and saves loading a model only to find a bad one.
            if name in PPL_TASKS:
                load_perplexity_text(name, path)
            else:
                load_task(name, path)
        tasks[name] = path or None
    return tasks


# What a model folder holds that loading reads (besides its weight files, found by suffix).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".index.json")


def inputs(*sources: str | None, text: str | None = None, routers: str | None = None, lora: str | None = None,
           model: str | None = None) -> dict[str, list]:
    """check_output's reads= and scans= for what a command reads: `sources` (task or data paths: a file is read,
    a folder scanned), a text file, a router folder, an adapter folder and a model folder (only the files loading
    reads: a result written beside them, as `eval --routers runs/X --output runs/X/eval.json` does, replaces
    nothing)."""
    sources = tuple(f for f in sources if f)  # (an empty one is refused by the command's own check, not read as ".")
    reads: list = [*sources, text]
    scans: list = [f for f in sources if expand_user(f).is_dir()]
    if routers is not None:
        reads += [Path(routers, name) for name in (CONFIG_NAME, WEIGHTS_NAME, FORECASTERS_NAME)]
        scans.append(Path(routers, ADAPTER_DIR))
    if lora is not None:
        scans.append(lora)
    if model is not None and expand_user(model).is_dir():
        folder = expand_user(model)
        reads += [folder / name for name in MODEL_FILES]
        reads += [f for f in folder.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)]
    elif model is not None:
        reads.append(model)  # a GGUF file (or a hub name or alias, which no output can be)
    return {"reads": reads, "scans": scans}


def write_results(path: str, results: Any) -> None:
    """Write the JSON results a command computed to `path` (--output, checked before the work began). If
    the write still fails (disk full, the folder removed meanwhile), print them to stdout rather than
    lose them, then fail in one line."""
    try:
        write_json_atomic(path, results)
    except OSError as e:
        print(json.dumps(results, indent=2, sort_keys=True))
        raise ConfigError(f"could not write {path} ({e.strerror}); the results are printed above") from None


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """Apply --threads and resolve --device and --dtype: the dtype= and device= keywords of load_model."""
    apply_threads(args)
    device = resolve_device(args)
    return {"dtype": resolve_dtype(args, device), "device": device}
