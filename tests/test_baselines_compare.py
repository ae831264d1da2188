"""`compare` end to end on a tiny model with a real tokenizer: every method built, evaluated, tabled, cached."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf

from skipgpt.baselines import compare
from skipgpt.baselines.compare import CompareSettings, artifact_dir, run_comparison
from skipgpt.baselines.figure import comparison_figure
from skipgpt.baselines.registry import METHODS
from skipgpt.baselines.table import markdown_table
from skipgpt.cli.compare import parse_sparsities
from skipgpt.errors import ConfigError, DataError
from skipgpt.training.config import TrainConfig

from conftest import WORDS, one_error_line, run_cli, save_tiny_llama

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "piqa" / "valid.jsonl").exists(), reason="shared data not present")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random llama saved with the SmolLM2 tokenizer, loadable by skipgpt.load_model(folder)."""
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(folder, layers=8, with_special_ids=True)
    return folder


@needs_data
def test_compare_all_methods_end_to_end(tiny_folder, tmp_path, monkeypatch):
    settings = CompareSettings(
        model=str(tiny_folder),
        tasks={"piqa": str(DATA / "piqa"), "wikitext2": str(DATA / "wikitext2" / "wiki.test.raw")},
        methods=list(METHODS), steps=2, data=str(DATA / "text" / "tinyshakespeare.txt"), limit=3,
        workdir=tmp_path / "work", seq_len=32, batch_size=2, eval_batch_size=4, eval_seq_len=32,
        calibration_sequences=4,
    )
    logs: list[str] = []
    rows = run_comparison(settings, [0.25], log=logs.append)
    assert [r["method"] for r in rows] == list(METHODS)
    by = {r["method"]: r for r in rows}
    assert by["dense"]["sparsity"]["param"] == 0.0
    assert by["dense"]["retention"] == pytest.approx(100.0)
    for name, row in by.items():
        assert set(row) >= {"method", "sparsity", "tasks", "average_acc", "retention"}
        assert row["tasks"]["piqa"]["n"] == 3 and "acc" in row["tasks"]["piqa"]
        assert row["tasks"]["wikitext2"]["ppl"] > 1
        if name != "dense":
            assert row["retention"] == pytest.approx(100 * row["average_acc"] / by["dense"]["average_acc"])
    # static baselines hit the target within 2 points on the evaluation tokens (8 layers: 1/16 steps)
    for name in ("shortgpt", "static-modules", "mod-d"):
        assert abs(by[name]["sparsity"]["param"] - 0.25) <= 0.02 + (0.08 if name == "mod-d" else 0), name
    assert by["shortgpt"]["sparsity"]["attention"] == pytest.approx(by["shortgpt"]["sparsity"]["mlp"])
    assert by["coupled"]["sparsity"]["attention"] == pytest.approx(by["coupled"]["sparsity"]["mlp"])
    for name in METHODS:
        if name != "dense":
            assert (artifact_dir(settings, name, 0.25) / "skip_config.json").exists(), name
    assert (artifact_dir(settings, "skipgpt-rt-lora", 0.25) / "adapter").exists() or any(
        p.name == "adapter_config.json" for p in artifact_dir(settings, "skipgpt-rt-lora", 0.25).rglob("*"))
    # informed skipping: MLP routers with rank-min(32, hidden) forecasters; their fitting tokens on record
    informed = json.loads((artifact_dir(settings, "skipgpt-informed", 0.25) / "skip_config.json").read_text())
    assert informed["router"] == "mlp" and informed["forecaster_rank"] == min(32, informed["base"]["hidden_size"])
    build = json.loads((artifact_dir(settings, "skipgpt-informed", 0.25) / "build.json").read_text())
    assert build["fit_tokens"] > 0 and build["tune_tokens"] == TrainConfig().forecaster_steps * 2 * 32  # steps x batch
    for name in ("skipgpt-informed", "skipgpt-informed-lora"):
        assert (artifact_dir(settings, name, 0.25) / "forecasters.safetensors").exists(), name
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 2 and "retention" in table and "wikitext2 ppl" in table
    png = comparison_figure(rows, tmp_path / "compare.png", "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # a second run reuses every artifact and cached evaluation: same numbers, nothing rebuilt
    logs.clear()
    again = run_comparison(settings, [0.25], log=logs.append)
    assert json.dumps(again, sort_keys=True) == json.dumps(rows, sort_keys=True)
    assert sum("reusing" in m for m in logs) == len(METHODS) - 1
    # a trained build from before sparsity was charged the routers (no accounting on record) is rebuilt
    log_rt = artifact_dir(settings, "skipgpt-rt", 0.25) / "build.json"
    old = json.loads(log_rt.read_text())
    del old["settings"]["sparsity"]
    log_rt.write_text(json.dumps(old))
    settings.methods = ["skipgpt-rt"]
    logs.clear()
    run_comparison(settings, [0.25], log=logs.append)
    assert any("was built with other settings" in m for m in logs)
    # the informed recipe is part of an informed build's settings: under another one it is rebuilt
    monkeypatch.setattr(compare, "INFORMED_ROUTER", "linear")
    settings.methods = ["skipgpt-informed"]
    logs.clear()
    run_comparison(settings, [0.25], log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert json.loads((artifact_dir(settings, "skipgpt-informed", 0.25) / "skip_config.json").read_text())[
        "router"] == "linear"
    # other build settings: that method is rebuilt and re-evaluated, not silently reused
    settings.calibration_sequences, settings.methods = 2, ["shortgpt"]
    logs.clear()
    run_comparison(settings, [0.25], log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert json.loads((artifact_dir(settings, "shortgpt", 0.25) / "build.json").read_text())["settings"][
        "calibration_sequences"] == "2"
    log_path = artifact_dir(settings, "shortgpt", 0.25) / "build.json"
    settings.methods = ["dense", "shortgpt"]
    logs.clear()
    fp32 = run_comparison(settings, [0.25], log=logs.append)
    assert any("reusing" in m for m in logs) and not any("rebuilding" in m for m in logs)
    # the base dtype is a build setting, and its evaluations are cached apart from the fp32 ones
    settings.dtype = "bfloat16"
    logs.clear()
    bf16 = run_comparison(settings, [0.25], log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert json.loads(log_path.read_text())["settings"]["dtype"] == "bfloat16"
    assert len(list(artifact_dir(settings, "dense", 0.0).glob("eval-*.json"))) == 2
    assert fp32[0]["method"] == bf16[0]["method"] == "dense"
    dense32, dense16 = fp32[0]["tasks"]["wikitext2"]["ppl"], bf16[0]["tasks"]["wikitext2"]["ppl"]
    assert dense16 != dense32 and dense16 == pytest.approx(dense32, rel=0.05)


def test_comparison_figure_draws_a_dollar_in_its_title_as_text(tmp_path):
    rows = [{"method": m, "target_sparsity": t, "retention": r, "tasks": {"wikitext2": {"ppl": p}}}
            for m, t, r, p in (("dense", 0.0, 100.0, 20.0), ("shortgpt", 0.25, 90.0, 80.0))]
    png = comparison_figure(rows, tmp_path / "c.png", "models/$$x$$: every method")  # mathtext would raise
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_figure_draws_only_panels_with_values_and_names_targets_as_the_table(tmp_path, monkeypatch):
    """Perplexity alone drew an empty accuracy panel beside it; targets 25.45% and 25.41% both read 25.4%."""
    from skipgpt.baselines import figure

    drawn = []
    monkeypatch.setattr(figure, "save_figure", lambda fig, path: drawn.append(fig) or path)
    rows = [{"method": m, "target_sparsity": t, "retention": None, "tasks": {"wikitext2": {"ppl": p}}}
            for m, t, p in (("dense", 0.0, 20.0), ("shortgpt", 0.2545, 80.0), ("shortgpt", 0.2541, 81.0))]
    comparison_figure(rows, tmp_path / "c.png")
    (axes,) = [fig.axes for fig in drawn]
    assert [ax.get_ylabel() for ax in axes] == ["wikitext2 perplexity (log scale)"]
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["dense", "target 25.41%", "target 25.45%"]


def test_compare_argument_errors():
    assert parse_sparsities("0.25,0.4") == [0.25, 0.4]
    with pytest.raises(ConfigError, match="not a number"):
        parse_sparsities("25%")
    with pytest.raises(ConfigError, match="fraction"):
        parse_sparsities("25")
    with pytest.raises(ConfigError, match="0.25 more than once"):
        parse_sparsities("0.25,0.4,0.25")
    row = {"method": "shortgpt", "target_sparsity": 0.254, "sparsity": {"param": 0.25, "attention": 0.25, "mlp": 0.25},
           "tasks": {}, "average_acc": None, "retention": None}
    assert "| shortgpt | 25.4% |" in markdown_table([row])  # not rounded to the 25% row's target
    assert "| shortgpt | 25.45% |" in markdown_table([{**row, "target_sparsity": 0.2545}])  # nor to 25.4%'s
    from skipgpt.baselines.compare import check_methods

    with pytest.raises(ConfigError, match="unknown methods"):
        check_methods(["shortgpt", "magic"])


@needs_data
def test_compare_command_writes_json_markdown_and_figure(tiny_folder, tmp_path):
    from skipgpt.cli.main import main

    out = tmp_path / "cmp.json"
    code = main(["compare", "--model", str(tiny_folder), "--methods", "dense,shortgpt,random", "--sparsity", "0.25",
                 "--task", f"wikitext2={DATA / 'wikitext2' / 'wiki.test.raw'}", "--limit", "2",
                 "--eval-seq-len", "32", "--data", str(DATA / "text" / "tinyshakespeare.txt"), "--seq-len", "32",
                 "--calibration-sequences", "2", "--seed", "3", "--output", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["dense", "shortgpt", "random"]
    # --seed reaches a seeded build (a run-to-run spread comes from tables that differ only in it); Block Influence
    # on file data does not read it
    build = json.loads((tmp_path / "cmp_artifacts" / "random-25" / "build.json").read_text())
    assert build["settings"]["seed"] == "3"
    assert "seed" not in json.loads((tmp_path / "cmp_artifacts" / "shortgpt-25" / "build.json").read_text())[
        "settings"]
    for row in rows:  # the row shape scripts outside the repository read
        assert set(row) >= {"method", "sparsity", "tasks", "average_acc", "retention"}
        assert set(row["sparsity"]) == {"param", "attention", "mlp"}
    assert "| shortgpt |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000


@needs_data
def test_compare_reuses_nothing_built_or_evaluated_for_other_inputs(tiny_folder, tmp_path, monkeypatch):
    """The dense evaluation belongs to its model; random routing to the SkipGPT-RT build whose rates it copies;
    a rebuild cut short after its save does not pass for the old settings."""
    other = tmp_path / "other"
    save_tiny_llama(other, layers=2, with_special_ids=True)
    settings = CompareSettings(
        model=str(tiny_folder), tasks={"wikitext2": str(DATA / "wikitext2" / "wiki.test.raw")}, methods=["dense"],
        steps=2, data=str(DATA / "text" / "tinyshakespeare.txt"), limit=2, workdir=tmp_path / "work", seq_len=32,
        batch_size=2, eval_batch_size=2, eval_seq_len=32, calibration_sequences=4)
    first = run_comparison(settings, [0.25], log=lambda _: None)[0]["tasks"]["wikitext2"]["ppl"]
    settings.model = str(other)
    second = run_comparison(settings, [0.25], log=lambda _: None)[0]["tasks"]["wikitext2"]["ppl"]
    settings.workdir = tmp_path / "fresh"
    assert second != first
    assert second == run_comparison(settings, [0.25], log=lambda _: None)[0]["tasks"]["wikitext2"]["ppl"]

    # random routing first without, then with the SkipGPT-RT build it takes its per-module rates from
    settings.workdir, settings.model = tmp_path / "work", str(tiny_folder)
    random_config = artifact_dir(settings, "random", 0.25) / "skip_config.json"
    settings.methods = ["random"]
    run_comparison(settings, [0.25], log=lambda _: None)
    assert set(sum(json.loads(random_config.read_text())["extra"]["skip_rates"], [])) == {0.25}
    settings.methods = ["skipgpt-rt", "random"]
    run_comparison(settings, [0.25], log=lambda _: None)
    assert len(set(sum(json.loads(random_config.read_text())["extra"]["skip_rates"], []))) > 1

    # a shortgpt rebuild interrupted after its save, before its build log: the old settings rebuild it again
    settings.methods = ["shortgpt"]
    run_comparison(settings, [0.25], log=lambda _: None)
    settings.calibration_sequences = 2

    def interrupted(path, data):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(compare, "write_json_atomic", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_comparison(settings, [0.25], log=lambda _: None)
    settings.calibration_sequences = 4
    logs: list[str] = []
    run_comparison(settings, [0.25], log=logs.append)
    assert not any("reusing" in m for m in logs)


def write_words(path: Path, seed: int, count: int = 600) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(count)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(a 4-layer tiny model folder, an evaluation text, a training text): compare runs of a few seconds."""
    root = tmp_path_factory.mktemp("small")
    save_tiny_llama(root / "model", layers=4, with_special_ids=True)
    return root / "model", write_words(root / "eval.txt", 0), write_words(root / "data.txt", 1)


def small_settings(model: Path, eval_text: Path, data: Path, workdir: Path, methods: list[str]) -> CompareSettings:
    return CompareSettings(model=str(model), tasks={"wikitext2": str(eval_text)}, methods=methods, steps=1,
                           data=str(data), limit=1, workdir=workdir, seq_len=32, batch_size=2, eval_batch_size=2,
                           eval_seq_len=32, calibration_sequences=2)


def influence(s: CompareSettings) -> list:
    return json.loads((artifact_dir(s, "shortgpt", 0.25) / "skip_config.json").read_text())["extra"][
        "block_influence"]


def test_compare_rebuilds_and_reevaluates_for_new_data_or_weights_under_the_same_names(small, tmp_path):
    model_folder, eval_text, _ = small
    model = Path(shutil.copytree(model_folder, tmp_path / "model"))
    data = write_words(tmp_path / "data.txt", 1)
    s = small_settings(model, eval_text, data, tmp_path / "work", ["dense", "shortgpt"])
    first = run_comparison(s, [0.25], log=lambda _: None)
    before = influence(s)
    # other text under the same data path: shortgpt is rebuilt, as a fresh workdir builds it
    write_words(data, 2)
    logs: list[str] = []
    run_comparison(s, [0.25], log=logs.append)
    assert any("rebuilding" in m for m in logs)
    fresh = dataclasses.replace(s, workdir=tmp_path / "fresh")
    run_comparison(fresh, [0.25], log=lambda _: None)
    assert influence(s) != before and influence(s) == influence(fresh)
    # other weights under the same model name: dense is evaluated again, shortgpt rebuilt for them
    hf = tf.AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(1.5)
    hf.save_pretrained(model)
    again = run_comparison(s, [0.25], log=lambda _: None)
    want = run_comparison(dataclasses.replace(s, workdir=tmp_path / "fresh2"), [0.25], log=lambda _: None)
    ppl = [rows[0]["tasks"]["wikitext2"]["ppl"] for rows in (first, again, want)]
    assert ppl[1] != ppl[0] and ppl[1] == ppl[2]
    def scores(rows: list[dict]) -> list[dict]:  # every task's numbers but its wall time
        return [{n: {k: v for k, v in t.items() if k != "seconds"} for n, t in r["tasks"].items()} for r in rows]

    assert scores(again) == scores(want)


def test_compare_keeps_targets_that_print_alike_apart(small, tmp_path):
    model, eval_text, data = small
    s = small_settings(model, eval_text, data, tmp_path / "work", ["shortgpt"])
    with pytest.raises(ConfigError, match=r"0.25 and 0.2500001 would share the build folders <method>-25;"):
        run_comparison(s, [0.25, 0.2500001], log=lambda _: None)
    assert not s.workdir.exists()  # refused before any work
    run_comparison(s, [0.25], log=lambda _: None)
    logs: list[str] = []
    run_comparison(s, [0.2500001], log=logs.append)  # its own run: the 0.25 build is not taken for it
    assert not any("reusing" in m for m in logs)
    assert json.loads((artifact_dir(s, "shortgpt", 0.2500001) / "build.json").read_text())["sparsity"] == 0.2500001


def test_compare_refuses_missing_data_before_the_dense_evaluation(small, tmp_path):
    model, eval_text, _ = small
    s = small_settings(model, eval_text, tmp_path / "missing.txt", tmp_path / "work", ["dense", "shortgpt"])
    with pytest.raises(DataError, match="does not exist"):
        run_comparison(s, [0.25], log=lambda _: None)
    assert not s.workdir.exists()


@pytest.mark.parametrize("suffix", [".md", ".png"])
def test_compare_command_refuses_a_folder_where_its_table_or_chart_goes_before_any_work(suffix, small, tmp_path,
                                                                                        capfd):
    model, eval_text, data = small
    (tmp_path / f"cmp{suffix}").mkdir()
    argv = ["compare", "--model", str(model), "--methods", "dense,shortgpt", "--task", f"wikitext2={eval_text}",
            "--limit", "1", "--eval-seq-len", "32", "--data", str(data), "--seq-len", "32",
            "--calibration-sequences", "2", "--output", str(tmp_path / "cmp.json")]
    capfd.readouterr()
    assert run_cli(argv) == 2
    assert f"cmp{suffix} is a folder" in one_error_line(capfd.readouterr().err, "compare")
    assert [p.name for p in tmp_path.iterdir()] == [f"cmp{suffix}"]  # no results, no artifacts


def test_table_names_the_metric_a_cell_falls_back_to():
    row = {"method": "dense", "sparsity": {"param": 0.0, "attention": 0.0, "mlp": 0.0},
           "tasks": {"hellaswag": {"acc": 0.1234}, "openbookqa": {"acc": 0.3, "acc_norm": 0.4}}}
    table = markdown_table([row])
    assert "| hellaswag acc_norm | openbookqa acc_norm |" in table
    assert f"| {100 * 0.1234:.1f} (acc) | {100 * 0.4:.1f} |" in table


def test_compare_reevaluates_when_a_task_file_changes_under_the_same_path(small, tmp_path):
    model, eval_text, data = small
    text = Path(shutil.copy(eval_text, tmp_path / "eval.txt"))
    s = small_settings(model, text, data, tmp_path / "work", ["dense"])
    first = run_comparison(s, [0.25], log=lambda _: None)
    original = text.read_text()
    text.write_text(original[len(original) // 2:] + original[: len(original) // 2])  # other windows, same length
    again = run_comparison(s, [0.25], log=lambda _: None)
    want = run_comparison(dataclasses.replace(s, workdir=tmp_path / "fresh"), [0.25], log=lambda _: None)
    ppl = [rows[0]["tasks"]["wikitext2"]["ppl"] for rows in (first, again, want)]
    assert ppl[1] != ppl[0] and ppl[1] == ppl[2]


def rebuilt(logs: list[str]) -> set[str]:
    return {name for name in ("shortgpt-25", "skipgpt-rt-25", "skipgpt-rt-lora-25")
            if any(f"{name} was built with other settings" in m for m in logs)}


def test_compare_rebuilds_only_the_builds_a_changed_setting_reaches(small, tmp_path):
    model, eval_text, data = small
    s = small_settings(model, eval_text, data, tmp_path / "work", ["shortgpt", "skipgpt-rt"])
    run_comparison(s, [0.25], log=lambda _: None)
    for change, want in [({"steps": 2}, {"skipgpt-rt-25"}),  # Block Influence reads no training recipe
                         ({"calibration_sequences": 3}, {"shortgpt-25"}),  # router tuning reads no calibration set
                         ({"seed": 1}, {"skipgpt-rt-25"}),  # file data: the calibration sequences need no seed
                         ({"seq_len": 16}, {"shortgpt-25", "skipgpt-rt-25"})]:
        s = dataclasses.replace(s, **change)
        logs: list[str] = []
        run_comparison(s, [0.25], log=logs.append)
        assert rebuilt(logs) == want, change
    # a build log that recorded more settings than its build reads (an older version's) stays current
    path = artifact_dir(s, "shortgpt", 0.25) / "build.json"
    log = json.loads(path.read_text())
    path.write_text(json.dumps({**log, "settings": {**log["settings"], "steps": "99", "alpha": "0.5"}}))
    logs = []
    run_comparison(s, [0.25], log=logs.append)
    assert not rebuilt(logs) and sum("reusing" in m for m in logs) == 2


def test_a_lora_build_logs_its_own_stage_not_stage_1(small, tmp_path, monkeypatch):
    """Its build seconds and token counts are the LoRA stage's, whether stage 1 was built in the same call."""
    model, eval_text, data = small
    clock = [0.0]
    real_train = compare.train

    def timed_train(cfg, **kwargs):
        clock[0] += 1000.0 if cfg.stage == "router" else 10.0
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(compare, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(compare, "train", timed_train)
    s = small_settings(model, eval_text, data, tmp_path / "work", ["skipgpt-informed-lora"])
    run_comparison(s, [0.25], log=lambda _: None)
    stage1, lora = (json.loads((artifact_dir(s, m, 0.25) / "build.json").read_text())
                    for m in ("skipgpt-informed", "skipgpt-informed-lora"))
    assert stage1["seconds"] == 1000.0 and stage1["fit_tokens"] > 0 and stage1["tune_tokens"] > 0
    assert lora["seconds"] == 10.0 and lora["fit_tokens"] == lora["tune_tokens"] == 0


def test_compare_refuses_training_sequences_past_the_context_before_the_dense_evaluation(small, tmp_path):
    model, eval_text, data = small  # the tiny model has 256 positions
    s = dataclasses.replace(small_settings(model, eval_text, data, tmp_path / "work", ["dense", "shortgpt"]),
                            seq_len=300)
    with pytest.raises(ConfigError, match="training sequences of 300 tokens exceed the model's maximum context"):
        run_comparison(s, [0.25], log=lambda _: None)
    assert not list(tmp_path.rglob("eval-*.json")) and not list(tmp_path.rglob("build.json"))


def test_compare_command_refuses_its_output_as_workdir_and_drops_a_stale_chart(small, tmp_path, capfd):
    model, eval_text, data = small
    out = tmp_path / "cmp.json"
    argv = ["compare", "--model", str(model), "--task", f"wikitext2={eval_text}", "--limit", "1", "--eval-seq-len",
            "32", "--data", str(data), "--seq-len", "32", "--calibration-sequences", "2", "--output", str(out)]
    for workdir in (out, out.with_suffix(".png")):
        capfd.readouterr()
        assert run_cli([*argv, "--methods", "dense", "--workdir", str(workdir)]) == 2
        assert "is where the results are written" in one_error_line(capfd.readouterr().err, "compare")
        assert not list(tmp_path.iterdir())
    assert run_cli([*argv, "--methods", "dense,shortgpt"]) == 0 and out.with_suffix(".png").exists()
    assert run_cli([*argv, "--methods", "dense"]) == 0
    assert not out.with_suffix(".png").exists()  # the earlier chart showed a method these results lack
    assert [r["method"] for r in json.loads(out.read_text())] == ["dense"]


def test_a_cached_evaluation_the_table_cannot_read_is_evaluated_again(small, tmp_path):
    model, eval_text, data = small
    s = small_settings(model, eval_text, data, tmp_path / "work", ["dense"])
    first = run_comparison(s, [0.25], log=lambda _: None)
    (cache,) = artifact_dir(s, "dense", 0.0).glob("eval-*.json")
    # valid JSON, but not what the table reads: tracebacks in make_row, or (a text ppl) a table without the column
    for broken in ([1, 2], "text", None, {"tasks": "x"}, {"tasks": {"wikitext2": 5}}, {"tasks": {}},
                   {"average_acc": "x", "tasks": first[0]["tasks"]}, {"tasks": {"wikitext2": {"ppl": "high"}}}):
        cache.write_text(json.dumps({"result": broken, "seconds": 1.0}))
        again = run_comparison(s, [0.25], log=lambda _: None)
        assert again[0]["tasks"]["wikitext2"]["ppl"] == first[0]["tasks"]["wikitext2"]["ppl"]
        assert isinstance(json.loads(cache.read_text())["result"], dict)


def test_another_spelling_of_the_same_paths_reuses_builds_and_evaluations(small, tmp_path, monkeypatch):
    """Relative, absolute and linked spellings of one model, data or task file name the same inputs; a build log
    written under an older spelling stays current."""
    model, eval_text, data = small
    s = small_settings(model, eval_text, data, tmp_path / "work", ["dense", "shortgpt"])
    run_comparison(s, [0.25], log=lambda _: None)
    (tmp_path / "link").symlink_to(model.parent)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    evaluated: list[str] = []
    monkeypatch.setattr(compare, "evaluate", lambda *a, **k: evaluated.append("x") or {})
    for spelling in (Path("link"), Path("./sub/../link"), model.parent):
        respelled = dataclasses.replace(s, model=str(spelling / model.name), data=str(spelling / data.name),
                                        tasks={"wikitext2": str(spelling / eval_text.name)}, workdir=Path("work"))
        logs: list[str] = []
        run_comparison(respelled, [0.25], log=logs.append)
        assert not rebuilt(logs) and any("reusing" in m for m in logs) and not evaluated, spelling
    path = artifact_dir(s, "shortgpt", 0.25) / "build.json"
    log = json.loads(path.read_text())
    path.write_text(json.dumps({**log, "settings": {**log["settings"], "data": str(Path("link") / data.name)}}))
    logs = []
    run_comparison(s, [0.25], log=logs.append)
    assert not rebuilt(logs) and not evaluated
    # a different file is not taken for the same one
    other = write_words(tmp_path / "other.txt", 1)  # the same words: only the spelling would tell them apart
    assert compare.spelled(str(other)) != compare.spelled(str(data))


def test_compare_refuses_text_too_short_to_train_on_before_the_dense_evaluation(small, tmp_path, capfd):
    model, eval_text, _ = small
    short = write_words(tmp_path / "short.txt", 1, count=20)
    s = small_settings(model, eval_text, short, tmp_path / "work", ["dense", "skipgpt-rt"])
    with pytest.raises(DataError, match=r"only \d+ sequences of 32 tokens.*a shorter --seq-len or \(train\)"):
        run_comparison(s, [0.25], log=lambda _: None)
    assert not list(tmp_path.rglob("eval-*.json"))


def test_a_build_changed_or_damaged_after_it_was_made_is_built_again(small, tmp_path):
    """The workdir is compare's cache: routers trained or edited into a build folder passed for the build (with its
    cached evaluation), and a truncated file stopped every rerun with 'save or train again'."""
    model, eval_text, data = small
    s = small_settings(model, eval_text, data, tmp_path / "work", ["shortgpt"])
    first = run_comparison(s, [0.25], log=lambda _: None)
    folder = artifact_dir(s, "shortgpt", 0.25)
    config = json.loads((folder / "skip_config.json").read_text())
    (folder / "skip_config.json").write_text(json.dumps({**config, "threshold": -50.0}))
    logs: list[str] = []
    again = run_comparison(s, [0.25], log=logs.append)
    ppl = first[0]["tasks"]["wikitext2"]["ppl"]
    assert rebuilt(logs) == {"shortgpt-25"} and again[0]["tasks"]["wikitext2"]["ppl"] == ppl
    weights = folder / "routers.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    logs = []
    again = run_comparison(s, [0.25], log=logs.append)
    assert any("cannot be loaded" in m and "rebuilding" in m for m in logs)
    assert again[0]["tasks"]["wikitext2"]["ppl"] == ppl
