"""Fuzz-style: every command, fed malformed files, flags, configs and output locations, answers with exit
status 2 and one line on stderr (no traceback) and leaves its output location as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from skipgpt import RoutedModel, load_model, save_routers

from conftest import PROGRESS_BAR, run_cli, snapshot, varied_routers


def bad_inputs(root: Path, tiny_dir: Path) -> dict[str, Path]:
    """One malformed thing of each kind, by name; plus good routers, a file and a folder to point at."""
    root.mkdir()
    binary = bytes(range(128, 256)) * 8
    files = {
        "text.gguf": b"not a model\n", "random.gguf": binary, "empty.gguf": b"", "magic.gguf": b"GGUF\x03\x00",
        "binary.jsonl": binary, "binary.txt": binary, "empty.txt": b"", "data.csv": b"text\nhello\n",
        "badjson.jsonl": b'{"text": "fine"}\n{oops\n', "nofield.jsonl": b'{"body": "no text field"}\n',
        "binary.yaml": binary, "broken.yaml": b"steps: [1, 2\n", "list.yaml": b"- steps\n- 3\n",
        "unknown.yaml": b"stepz: 3\n", "wrongtype.yaml": b"steps: many\n", "nan.yaml": b"lr: .nan\n",
        "file": b"an existing file\n",
    }
    paths = {name: root / name for name in files}
    for name, data in files.items():
        paths[name].write_bytes(data)
    for name in ("folder", "no-data-folder", "not-a-model"):
        paths[name] = root / name
        paths[name].mkdir()
    (paths["folder"] / "keep.txt").write_text("kept")
    (paths["not-a-model"] / "weights.bin").write_bytes(b"x")

    model, _ = load_model(str(tiny_dir / "model"))
    paths["routers"] = root / "routers"
    save_routers(RoutedModel(model), paths["routers"])
    for name, edit in {"threshold-abc": {"threshold": "abc"}, "threshold-null": {"threshold": None},
                       "router-nope": {"router": "nope"}, "unknown-key": {"colour": "red"},
                       "base-list": {"base": [1, 2]}, "files-list": {"files": ["routers.safetensors"]}}.items():
        paths[name] = root / name
        shutil.copytree(paths["routers"], paths[name])
        config = json.loads((paths[name] / "skip_config.json").read_text())
        config.update(edit)
        (paths[name] / "skip_config.json").write_text(json.dumps(config))
    paths["no-config"] = root / "no-config"
    shutil.copytree(paths["routers"], paths["no-config"])
    (paths["no-config"] / "skip_config.json").unlink()
    paths["binary-config"] = root / "binary-config"
    shutil.copytree(paths["routers"], paths["binary-config"])
    (paths["binary-config"] / "skip_config.json").write_bytes(binary)
    paths["mixed"] = root / "mixed"  # routers of another save beside the config
    save_routers(varied_routers(1), root / "other")  # same shapes, other router weights, another base model
    shutil.copytree(paths["routers"], paths["mixed"])
    (paths["mixed"] / "routers.safetensors").write_bytes((root / "other" / "routers.safetensors").read_bytes())
    paths["other-model"] = root / "other"  # routers of another base model (loads the model to tell)
    return paths


BAD_ROUTERS = ["missing", "file", "no-config", "binary-config", "threshold-abc", "threshold-null", "router-nope",
               "unknown-key", "base-list", "files-list", "mixed"]
BAD_MODELS = ["text.gguf", "random.gguf", "empty.gguf", "magic.gguf", "missing.gguf", "missing", "not-a-model"]


def cases(p: dict[str, Path], tiny_dir: Path, out: Path, readonly: Path) -> list[tuple[list[str], Path, bool]]:
    """(argv, the output location that must stay as it was, whether the model loads before the error)."""
    def at(name: str) -> str:
        return str(p.get(name, p["file"].parent / name))

    model, text, routers = str(tiny_dir / "model"), str(tiny_dir / "text.txt"), at("routers")
    run = out / "run"
    train = ["train", "--model", model, "--data", text, "--seq-len", "16", "--val-sequences", "4", "--steps", "1",
             "--no-progress"]
    found: list[tuple[list[str], Path, bool]] = []
    add = lambda argv, watched, loaded=False: found.append((argv, watched, loaded))  # noqa: E731

    # train: models, data, configs, flags, outputs, routers
    for m in BAD_MODELS:
        add([*train, "--model", at(m), "--output", str(run)], run)
    for d in ["missing.txt", "data.csv", "no-data-folder"]:
        add([*train, "--data", at(d), "--output", str(run)], run)
    for d in ["binary.jsonl", "binary.txt", "empty.txt", "badjson.jsonl", "nofield.jsonl"]:
        add([*train, "--data", at(d), "--output", str(run)], run, True)
    for c in ["binary.yaml", "broken.yaml", "list.yaml", "unknown.yaml", "wrongtype.yaml", "nan.yaml", "missing.yaml"]:
        add(["train", "--config", at(c), "--output", str(run)], run)
    for flags in (["--steps", "0"], ["--steps", "abc"], ["--lr", "inf"], ["--lr=-1"], ["--temperature-start", "nan"],
                  ["--target-sparsity", "1"], ["--stage", "nope"], ["--seq-len", "1"], ["--distill", "2"],
                  ["--alpha", "nan"], ["--checkpoint-every=-1"], ["--stage", "lora"]):
        add([*train, *flags, "--output", str(run)], run)
    add([*train, "--stage", "joint", "--lora-targets", "nope_proj", "--output", str(run)], run, True)
    add([*train, "--seq-len", "64", "--val-sequences", "64", "--output", str(run)], run, True)
    for o in (p["file"], p["file"] / "run", readonly / "run"):
        add([*train, "--output", str(o)], o)
    for r in BAD_ROUTERS:
        add([*train, "--stage", "lora", "--routers", at(r), "--output", str(run)], run)
    add([*train, "--stage", "lora", "--routers", at("other-model"), "--output", str(run)], run, True)

    # info
    for m in BAD_MODELS:
        add(["info", "--model", at(m)], out)
    for r in BAD_ROUTERS:
        add(["info", "--model", model, "--routers", at(r)], out)
    add(["info", "--model", model, "--routers", at("other-model")], out, True)

    # eval
    result = out / "e.json"
    evaluate = ["eval", "--model", model, "--task", f"wikitext2={text}", "--limit", "1", "--no-progress"]
    for flags in (["--task", "nope"], ["--task", f"wikitext2={at('missing.txt')}"], ["--task", "wikitext2"],
                  ["--device", "tpu"], ["--device", "cuda:99"], ["--limit", "0"], ["--seq-len", "1"],
                  ["--mode", "sparse"], ["--lora", at("folder")], ["--lora", at("missing")], ["--batch-size", "x"]):
        add([*evaluate, *flags, "--output", str(result)], result)
    for r in BAD_ROUTERS:
        add([*evaluate, "--routers", at(r), "--output", str(result)], result)
    for o in (p["folder"], p["file"] / "e.json", readonly / "e.json"):
        add([*evaluate, "--output", str(o)], o)
    for t in ("binary.txt", "empty.txt"):
        add(["eval", "--model", model, "--task", f"wikitext2={at(t)}", "--output", str(result)], result, True)

    # bench
    bench = ["bench", "--model", model, "--seq-len", "8", "--batch-size", "1", "--decode-tokens", "1",
             "--repeats", "1"]
    for flags in (["--device", "tpu"], ["--threads", "-1"], ["--threads", "0"], ["--sparsity", "1.5"],
                  ["--sparsity", "nan"], ["--seq-len", "0"], ["--model", at("text.gguf")]):
        add([*bench, *flags, "--output", str(result)], result)
    for r in BAD_ROUTERS:
        add([*bench, "--routers", at(r), "--output", str(result)], result)
    for o in (p["folder"], p["file"] / "b.json", readonly / "b.json"):
        add([*bench, "--output", str(o)], o)

    # analyze
    figures = out / "figures"
    analyze = ["analyze", "--model", model, "--routers", routers, "--text", text]
    for flags in (["--text", at("missing.txt")], ["--text", at("binary.txt")], ["--text", at("empty.txt")],
                  ["--seq-len", "1"], ["--model", at("random.gguf")]):
        add([*analyze, *flags, "--output", str(figures)], figures)
    for r in BAD_ROUTERS:
        add([*analyze, "--routers", at(r), "--output", str(figures)], figures)
    for o in (p["file"], readonly / "figures"):
        add([*analyze, "--output", str(o)], o)

    # compare
    table = out / "cmp.json"
    compare = ["compare", "--model", model, "--task", f"wikitext2={text}", "--steps", "1"]
    for flags in (["--task", "nope"], ["--methods", "nope"], ["--sparsity", "2"], ["--sparsity", "0.2,x"],
                  ["--workdir", str(p["file"])]):
        add([*compare, *flags, "--output", str(table)], table)
    for o in (p["folder"], readonly / "cmp.json"):
        add([*compare, "--output", str(o)], o)

    # demo
    demo = out / "demo"
    for flags in (["--sparsity", "1"], ["--steps", "0"], ["--seq-len", "1"], ["--model", at("empty.gguf")]):
        add(["demo", *flags, "--output", str(demo)], demo)
    for o in (p["file"], readonly / "demo"):
        add(["demo", "--output", str(o)], o)

    # generate
    for flags in (["--prompt", " "], ["--prompt", "hi", "--device", "tpu"], ["--prompt", "hi", "--model",
                  at("magic.gguf")], ["--prompt", "hi", "--routers", at("threshold-abc")]):
        add(["generate", "--model", model, *flags], out)
    return found


def test_every_command_answers_malformed_input_with_one_line_and_changes_nothing(tmp_path, tiny_dir, readonly_dir,
                                                                                capfd):
    paths = bad_inputs(tmp_path / "inputs", tiny_dir)
    out = tmp_path / "out"
    out.mkdir()
    failures = []
    for argv, watched, loaded in cases(paths, tiny_dir, out, readonly_dir):
        before = snapshot(watched)
        capfd.readouterr()
        try:
            code = run_cli(argv)
        except BaseException as e:  # noqa: BLE001 - a traceback is what this test looks for
            capfd.readouterr()
            failures.append(f"{' '.join(argv)}\n    raised {type(e).__name__}: {e}")
            continue
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not (loaded and PROGRESS_BAR.search(line))]
        ok = code == 2 and len(lines) == 1 and lines[0].startswith(f"skipgpt {argv[0]}: error: ")
        if not ok or "Traceback" in err:
            failures.append(f"{' '.join(argv)}\n    exit {code}, stderr: {err.strip()[-600:]}")
        elif snapshot(watched) != before:
            failures.append(f"{' '.join(argv)}\n    changed {watched}")
    assert not failures, f"{len(failures)} cases failed:\n" + "\n".join(failures)
