"""Scores through lm-evaluation-harness equal an independent log-likelihood loop; perplexity equals
exp of the mean token NLL computed directly; the CLI writes the documented JSON."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from skipgpt import RoutedModel, SkipConfig, save_routers
from skipgpt.errors import ConfigError, DataError
from skipgpt.evaluation.harness import SkipGPTLM, _real_tokens, build_task, run_task
from skipgpt.evaluation.perplexity import context_buckets, perplexity
from skipgpt.evaluation.runner import evaluate, markdown_table
from skipgpt.evaluation.tasks import choices_and_gold, load_task
from skipgpt.models.loading import load_model

from conftest import make_tiny, save_tiny_llama, varied_routers

FIX = Path(__file__).resolve().parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from skipgpt.models.loading import resolve

    folder, _ = resolve("smollm2-135m")
    return AutoTokenizer.from_pretrained(folder)


def tiny_lm(vocab: int, seed: int = 0):
    """A tiny random llama that speaks the SmolLM2 tokenizer's vocabulary."""
    return make_tiny("llama", seed, vocab_size=vocab, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_lm(len(tokenizer))


def hidden_sign_policy(layer, kind, x):
    """Skip where the first hidden feature is negative: token-dependent and causal, so batching can't change it."""
    return x[..., 0] > 0


# -- an independent scorer: the prompt written out by hand, log-probs summed directly ------------------------


def prompt(name: str, doc: dict) -> str:
    if name == "piqa":
        return f"Question: {doc['goal']}\nAnswer:"
    if name in ("arc_easy", "arc_challenge"):
        return f"Question: {doc['question']}\nAnswer:"
    if name == "boolq":
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    if name == "hellaswag":
        return doc["query"]
    raise ValueError(name)


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
    positions = range(len(whole) - 1 - len(cont), len(whole) - 1)
    return sum(float(logits[p, t]) for p, t in zip(positions, cont))


def flat(nested: list[list[float]]) -> list[float]:
    return [x for row in nested for x in row]


def independent_scores(model, tokenizer, name: str, docs: list[dict]) -> tuple[float, float, list[list[float]]]:
    acc = acc_norm = 0
    all_ll = []
    for doc in docs:
        choices, gold = choices_and_gold(name, doc)
        ll = [loglikelihood(model, tokenizer, prompt(name, doc), " " + c) for c in choices]
        norm = [x / len(c) for x, c in zip(ll, choices)]
        acc += int(max(range(len(ll)), key=ll.__getitem__) == gold)
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
        all_ll.append(ll)
    return acc / len(docs), acc_norm / len(docs), all_ll


@pytest.mark.parametrize(
    "name, path",
    [("piqa", "piqa"), ("arc_easy", "arc_easy"), ("boolq", "boolq"), ("hellaswag", "hellaswag/hellaswag_val_full.txt")],
)
def test_harness_accuracy_equals_independent_loglikelihood(model, tokenizer, name, path):
    data = load_task(name, FIX / path)
    lm = SkipGPTLM(model, tokenizer=tokenizer, batch_size=2)
    got = run_task(lm, build_task(data), log_samples=True)
    acc, acc_norm, ll = independent_scores(model, tokenizer, name, data.docs)
    assert got["n"] == len(data.docs)
    assert got["acc"] == pytest.approx(acc) and got["acc_norm"] == pytest.approx(acc_norm)
    harness_ll = [[r[0][0] for r in s["resps"]] for s in sorted(got["samples"], key=lambda s: s["doc_id"])]
    assert flat(harness_ll) == pytest.approx(flat(ll), abs=1e-3)


def test_hellaswag_jsonl_goes_through_the_stock_preprocessing(model, tokenizer):
    task = build_task(load_task("hellaswag", FIX / "hellaswag" / "hellaswag_val.jsonl"))
    doc = list(task.test_docs())[0]
    # ctx_b capitalised, " [title]" turned into ". " and double spaces collapsed, as the harness does.
    assert task.doc_to_text(doc) == "Baking cookies: A woman mixes flour and sugar in a bowl. She"
    assert task.doc_to_choice(doc)[1] == "paints the bowl. blue."
    assert task.doc_to_target(doc) == 2


def test_llamacpp_hellaswag_is_scored_as_written(tmp_path):
    # Published numbers come from this file as it stands: its ctx_b stays lower-case and its "[...]" text
    # stays, where the stock preprocessing would capitalise and remove them.
    prompt = "Painting a fence: A man dips a brush in paint. he [title] starts at the gate."
    endings = ["paints the [step] boards white.", "eats the brush.", "flies away.", "sings to the fence."]
    file = tmp_path / "hellaswag_val_full.txt"
    file.write_text("\n".join([prompt, "0", *endings]) + "\n")
    data = load_task("hellaswag", tmp_path)
    assert data.format == "llamacpp"
    task = build_task(data)
    doc = list(task.test_docs())[0]
    assert task.doc_to_text(doc) == prompt
    assert task.doc_to_choice(doc) == endings and task.doc_to_target(doc) == 0


def test_routed_model_scores_and_sparsity_exclude_pads(model, tokenizer):
    routed = RoutedModel(model, SkipConfig())
    try:
        routed.force(hidden_sign_policy)
        data = load_task("arc_easy", FIX / "arc_easy")
        acc, acc_norm, ll = independent_scores(routed, tokenizer, "arc_easy", data.docs)
        reports = []
        for batch_size in (1, 4):  # batch 4 right-pads; pads must not enter the statistics
            routed.reset_sparsity()
            lm = SkipGPTLM(routed, tokenizer=tokenizer, batch_size=batch_size)
            got = run_task(lm, build_task(data), log_samples=True)
            reports.append(routed.sparsity())
            harness_ll = [[r[0][0] for r in s["resps"]] for s in sorted(got["samples"], key=lambda s: s["doc_id"])]
            assert flat(harness_ll) == pytest.approx(flat(ll), abs=1e-3)
            assert (got["acc"], got["acc_norm"]) == pytest.approx((acc, acc_norm))
        assert reports[0].tokens == reports[1].tokens > 0
        assert 0.05 < reports[0].param < 0.95
        assert reports[1].param == pytest.approx(reports[0].param, abs=1e-9)
    finally:
        routed.unpatch()


def test_real_token_mask_from_right_padding():
    inps = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0], [0, 3, 0, 0]])
    assert _real_tokens(inps).tolist() == [[True] * 4, [True, True, False, False], [True, True, False, False]]


@pytest.mark.parametrize("mode", ["masked", "sparse"])
def test_a_real_token_id_0_scores_the_same_at_any_batch_size(model, tokenizer, mode):
    """The harness right-pads with id 0, so a row whose input ends in a real id 0 looks padded: that guess may
    only touch the sparsity statistics, never the scores (the token must still attend to itself)."""
    reqs = [(("a", "b"), [5, 6, 7, 8, 9, 10, 11], [12, 13]),  # the longest row: never padded
            (("c", "d"), [5, 6, 7], [0, 14])]  # its input is [5, 6, 7, 0]: the last input token is id 0
    routed = varied_routers(model=model)  # random routers: the id-0 token executes attention in most layers
    try:
        routed.set_mode(mode)
        want = []  # an independent log-softmax of the same routed model, one request at a time
        with torch.no_grad():
            for _, ctx, cont in reqs:
                logp = routed(input_ids=torch.tensor([(ctx + cont)[:-1]])).logits[0].log_softmax(-1)
                want.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        got, tokens = {}, {}
        for batch_size in (1, 2):
            routed.reset_sparsity()
            lm = SkipGPTLM(routed, tokenizer=tokenizer, batch_size=batch_size)
            got[batch_size] = [ll for ll, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
            tokens[batch_size] = routed.sparsity().tokens
    finally:
        routed.unpatch()
    assert got[1] == pytest.approx(want, abs=1e-4) and got[2] == pytest.approx(want, abs=1e-4)
    # Batch 2 pads [5, 6, 7, 0] to 8 tokens: the pads stay out of the statistics, and so does the real id 0
    # (the documented cost of guessing pads from the ids alone).
    assert tokens[1] == 8 + 4 and tokens[2] == 8 + 3


def test_lm_eval_default_device_falls_back_to_the_cpu_without_cuda(tmp_path, monkeypatch):
    """`lm_eval run` passes device=cuda:0 unless told otherwise; like the stock hf model, run on the CPU when
    CUDA is not available instead of failing."""
    save_tiny_llama(tmp_path / "m", layers=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = SkipGPTLM.create_from_arg_string(f"pretrained={tmp_path / 'm'}", {"batch_size": 1, "device": "cuda:0"})
    assert lm.device.type == "cpu" and next(lm.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("arg", ["router=r", "peft=adapter", "rooters=r,mode=sparse", "parallelize=True"])
def test_unknown_model_args_are_refused(tmp_path, arg):
    """A typo of routers= (or HFLM's peft=) must not evaluate the dense model without a word."""
    key = arg.split("=")[0]
    with pytest.raises(ConfigError, match=f"unknown model_args.*'{key}'"):
        SkipGPTLM.create_from_arg_string(f"pretrained={tmp_path / 'never-loaded'},{arg}", {"device": "cpu"})


def test_numeric_model_args_are_names(tmp_path, monkeypatch, tokenizer):
    """lm-eval turns `routers=1` into the int 1; folders named by digits still load."""
    from peft import LoraConfig, get_peft_model  # seconds to import: only this test pays for it

    save_tiny_llama(tmp_path / "3", layers=1)
    save_routers(RoutedModel(load_model(str(tmp_path / "3"))[0]), tmp_path / "1")
    lora_config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(load_model(str(tmp_path / "3"))[0], lora_config).save_pretrained(tmp_path / "2")
    monkeypatch.chdir(tmp_path)
    lm = SkipGPTLM.create_from_arg_string("pretrained=3,routers=1,lora=2,mode=sparse,batch_size=2", {"device": "cpu"})
    assert lm.routed is not None and lm.routed.mode == "sparse" and lm.batch_size == 2


# -- perplexity ---------------------------------------------------------------------------------------------


def direct_nll(model, ids: torch.Tensor, seq_len: int, windows: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * seq_len : (w + 1) * seq_len]
        with torch.no_grad():
            logp = model(input_ids=chunk[None]).logits[0].double().log_softmax(-1)
        for t in range(1, seq_len):
            total -= float(logp[t - 1, chunk[t]])
            count += 1
    return total / count, count


def test_perplexity_is_exp_of_mean_token_nll(model):
    ids = torch.randint(0, model.config.vocab_size, (103,), generator=torch.Generator().manual_seed(1))
    nll, count = direct_nll(model, ids, 16, 6)
    got = perplexity(model, ids, seq_len=16)
    assert got["windows"] == 6 and got["tokens"] == count == 6 * 15 and got["seq_len"] == 16
    assert got["nll"] == pytest.approx(nll, rel=1e-5) and got["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    limited = perplexity(model, ids, seq_len=16, limit=2, batch_size=4)
    assert limited["windows"] == 2 and limited["nll"] == pytest.approx(direct_nll(model, ids, 16, 2)[0], rel=1e-5)
    routed = RoutedModel(model, SkipConfig())
    try:
        with routed.forced(hidden_sign_policy):
            routed_ppl = perplexity(routed, ids, seq_len=16, batch_size=3)
            assert routed_ppl["nll"] == pytest.approx(direct_nll(routed, ids, 16, 6)[0], rel=1e-5)
    finally:
        routed.unpatch()
    assert routed_ppl["ppl"] != pytest.approx(got["ppl"])


def test_perplexity_by_context_length(model):
    ids = torch.randint(0, model.config.vocab_size, (140,), generator=torch.Generator().manual_seed(2))
    seq_len, windows = 20, 7
    assert context_buckets(seq_len) == [(1, 4), (4, 16), (16, 20)]
    assert context_buckets(4) == [(1, 4)] and context_buckets(64) == [(1, 4), (4, 16), (16, 64)]
    sums, counts = [0.0, 0.0, 0.0], [0, 0, 0]
    for w in range(windows):  # independent loop: one window, one target at a time
        chunk = ids[w * seq_len : (w + 1) * seq_len]
        with torch.no_grad():
            logp = model(input_ids=chunk[None]).logits[0].double().log_softmax(-1)
        for t in range(1, seq_len):
            b = 0 if t < 4 else 1 if t < 16 else 2
            sums[b] -= float(logp[t - 1, chunk[t]])
            counts[b] += 1
    got = perplexity(model, ids, seq_len=seq_len, batch_size=3)
    assert [b["context"] for b in got["by_context"]] == [[1, 4], [4, 16], [16, 20]]
    assert [b["tokens"] for b in got["by_context"]] == counts == [21, 84, 28]
    for b, s, n in zip(got["by_context"], sums, counts):
        assert b["nll"] == pytest.approx(s / n, rel=1e-5) and b["ppl"] == pytest.approx(math.exp(s / n), rel=1e-5)
    assert got["nll"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)


# -- the whole evaluation, from Python and from the command line ---------------------------------------------


def test_evaluate_shape_and_average(model, tokenizer):
    routed = RoutedModel(model, SkipConfig())
    try:
        routed.force(hidden_sign_policy)
        tasks = {"piqa": str(FIX / "piqa"), "hellaswag": str(FIX / "hellaswag" / "hellaswag_val_full.txt"),
                 "wikitext2": str(FIX / "hf" / "wikitext2")}
        out = evaluate(routed, tokenizer, tasks, limit=2, batch_size=2, seq_len=8, progress=False)
    finally:
        routed.unpatch()
    assert out["mode"] == "masked" and out["routers"] is None and list(out["tasks"]) == list(tasks)
    piqa, hs, wt = (out["tasks"][k] for k in tasks)
    assert piqa["n"] == 2 and hs["n"] == 2
    assert hs["format"] == "llamacpp" and piqa["format"] == "release"  # the text file's prompts are not stock
    assert out["average_acc"] == pytest.approx((piqa["acc"] + hs["acc_norm"]) / 2)
    assert wt["seq_len"] == 8 and wt["tokens"] == wt["windows"] * 7 and wt["windows"] <= 2
    for row in out["tasks"].values():
        assert set(row["sparsity"]) == {"param", "attention", "mlp"} and 0 < row["sparsity"]["param"] < 1
    assert "| piqa | 2 |" in markdown_table(out)


def test_windows_limit_perplexity_apart_from_items(model, tokenizer):
    # --limit N caps items and windows alike; --windows M sets the perplexity windows on their own
    # (the benchmark protocol: 500 items, 40 windows).
    tasks = {"piqa": str(FIX / "piqa"), "wikitext2": str(FIX / "hf" / "wikitext2")}
    both = evaluate(model, tokenizer, tasks, limit=2, batch_size=2, seq_len=4, progress=False)
    apart = evaluate(model, tokenizer, tasks, limit=2, windows=3, batch_size=2, seq_len=4, progress=False)
    assert both["tasks"]["wikitext2"]["windows"] == 2 and apart["tasks"]["wikitext2"]["windows"] == 3
    assert both["tasks"]["piqa"]["n"] == apart["tasks"]["piqa"]["n"] == 2
    assert apart["windows"] == 3 and both["windows"] == 2


def test_a_perplexity_text_shorter_than_a_window_is_refused_before_any_task_runs(model, tokenizer, monkeypatch):
    from skipgpt.evaluation import runner

    def must_not_run(*args, **kwargs):
        raise AssertionError("a multiple-choice task ran before the perplexity text was checked")

    monkeypatch.setattr(runner, "run_task", must_not_run)
    tasks = {"piqa": str(FIX / "piqa"), "wikitext2": str(FIX / "hf" / "wikitext2")}
    with pytest.raises(DataError, match=r"wikitext2: the text has \d+ tokens, fewer than one window of 256"):
        evaluate(model, tokenizer, tasks, limit=2, seq_len=256, progress=False)  # the model's whole context


def test_a_hub_task_that_cannot_load_is_refused_before_any_task_runs(model, tokenizer, monkeypatch):
    """`--task arc_easy=PATH --task piqa` offline: ARC-Easy was scored (hours on a full set), then piqa's hub load
    failed and no result was written."""
    from skipgpt.evaluation import runner

    def must_not_run(*args, **kwargs):
        raise AssertionError("a task ran before every task was loaded")

    def offline(data, name=None):  # what build_task raises when the hub cannot give the dataset
        if data is None:
            raise DataError(f"{name}: no PATH given and the hub dataset could not be loaded (ConnectionError)")
        return build_task(data, name)

    monkeypatch.setattr(runner, "run_task", must_not_run)
    monkeypatch.setattr(runner, "build_task", offline)
    with pytest.raises(DataError, match="hellaswag: no PATH given"):
        evaluate(model, tokenizer, {"piqa": str(FIX / "piqa"), "hellaswag": None}, limit=2, seq_len=8,
                 progress=False)


def test_no_progress_means_no_bars_from_the_harness_either(model, tokenizer, capfd):
    import lm_eval.api.task
    import tqdm

    tasks = {"piqa": str(FIX / "piqa")}
    for progress in (True, False):
        capfd.readouterr()
        evaluate(model, tokenizer, tasks, limit=2, progress=progress, seq_len=8)
        bars = [b for b in ("Tokenizing inputs", "Running loglikelihood requests", "it/s]")
                if b in capfd.readouterr().err]
        assert bool(bars) == progress, (progress, bars)  # with progress the harness does draw them
    assert lm_eval.api.task.tqdm is tqdm.tqdm  # its own bar is given back


@pytest.mark.parametrize("seq_len", [0, 1])
def test_windows_that_score_nothing_are_refused_not_replaced_by_the_default(model, tokenizer, seq_len):
    # seq_len=0 used to mean "the default" (2,048 tokens, the model's whole context here), silently
    with pytest.raises(ConfigError, match=f"windows of {seq_len} tokens score nothing"):
        evaluate(model, tokenizer, {"wikitext2": str(FIX / "hf" / "wikitext2")}, limit=1, seq_len=seq_len,
                 progress=False)


def test_evaluate_measures_with_tracking_off_and_keeps_the_callers_meter(model, tokenizer):
    routed = RoutedModel(model, SkipConfig())
    try:
        routed.force(hidden_sign_policy)
        routed(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))  # the caller has counted 5 tokens of its own
        before = routed.sparsity()
        with routed.using(track=False):
            out = evaluate(routed, tokenizer, {"wikitext2": str(FIX / "hf" / "wikitext2")}, limit=2, seq_len=8,
                           progress=False)
            assert routed.track is False, "the caller's setting is restored"
        assert routed.sparsity() == before and before.tokens == 5
    finally:
        routed.unpatch()
    assert 0 < out["tasks"]["wikitext2"]["sparsity"]["param"] < 1


def test_cli_end_to_end_with_a_model_folder(tmp_path, model, tokenizer, capsys):
    from skipgpt.cli import eval as cli

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    out = tmp_path / "results.json"
    args = parser.parse_args(["eval", "--model", str(folder), "--task", f"arc_easy={FIX / 'arc_easy'}",
                              "--task", f"ptb={FIX / 'ptb'}", "--seq-len", "8", "--output", str(out), "--no-progress"])
    assert cli.run(args) == 0
    result = json.loads(out.read_text())
    assert result["model"] == str(folder) and result["mode"] == "dense" and result["lora"] is None
    assert result["tasks"]["arc_easy"]["n"] == 3
    assert result["tasks"]["ptb"]["sparsity"] == {"param": 0.0, "attention": 0.0, "mlp": 0.0}
    assert result["average_acc"] == result["tasks"]["arc_easy"]["acc"]
    assert "| arc_easy | 3 |" in capsys.readouterr().out
    bad = parser.parse_args(["eval", "--model", str(folder), "--task", "mmlu=x"])
    with pytest.raises(ConfigError, match="unknown task 'mmlu'"):
        cli.run(bad)
    missing = parser.parse_args(["eval", "--model", str(tmp_path / "no-model"), "--task", f"piqa={tmp_path / 'nope'}"])
    with pytest.raises(DataError, match="nope: no such file"):  # data checked before the model loads
        cli.run(missing)


def test_registered_with_the_harness():
    from lm_eval.api.registry import get_model

    assert get_model("skipgpt") is SkipGPTLM


def test_prepare_model_attaches_routers_then_merges_lora(tmp_path, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    from skipgpt import load_model, load_routers, save_routers
    from skipgpt.artifact import apply_adapter
    from skipgpt.errors import ArtifactError
    from skipgpt.evaluation.harness import prepare_model

    base = tiny_lm(len(tokenizer), seed=3)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    routed = RoutedModel(base, SkipConfig(), name=str(tmp_path / "base"))
    with torch.no_grad():  # routers that skip some tokens and not others
        for router in [*routed.routers.attn, *routed.routers.mlp]:
            for p in router.parameters():
                p.normal_(0.0, 0.05)
    save_routers(routed, tmp_path / "routers")
    routed.unpatch()
    lora_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_lm(len(tokenizer), seed=3), lora_config).save_pretrained(tmp_path / "lora")

    loaded, _ = prepare_model(str(tmp_path / "base"), str(tmp_path / "routers"), str(tmp_path / "lora"))
    ids = torch.tensor([tokenizer("The river runs past the old mill.").input_ids])
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        decisions = loaded.decisions()
        # Reference: the same routers on a separately built PEFT model, decisions forced to match.
        ref_model = PeftModel.from_pretrained(tiny_lm(len(tokenizer), seed=3), str(tmp_path / "lora"))
        ref_model = ref_model.merge_and_unload()
        ref = RoutedModel(ref_model, SkipConfig())
        ref.force(decisions)
        want = ref(input_ids=ids).logits
        plain = tiny_lm(len(tokenizer), seed=3)(input_ids=ids).logits
    assert 0 < decisions.float().mean() < 1
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    with pytest.raises(ArtifactError, match="not a LoRA adapter folder"):
        prepare_model(str(tmp_path / "base"), lora=str(tmp_path))

    # A stage-2 directory holds its adapter: --routers DIR alone applies it, exactly as --lora DIR/adapter did;
    # naming that same adapter again applies it once, naming another one is refused.
    stage2 = tmp_path / "stage2"
    with_lora = load_routers(load_model(str(tmp_path / "base"))[0], tmp_path / "routers")
    save_routers(apply_adapter(with_lora, tmp_path / "lora", merge=False), stage2)
    for lora in (None, str(stage2 / "adapter")):
        again, _ = prepare_model(str(tmp_path / "base"), str(stage2), lora)
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, got)
    with pytest.raises(ConfigError, match="holds its own stage-2 adapter"):
        prepare_model(str(tmp_path / "base"), str(stage2), str(tmp_path / "lora"))
    # An adapter copied in by hand is not part of the saved run: refused, not silently applied or ignored.
    shutil.copytree(tmp_path / "lora", tmp_path / "routers" / "adapter")
    with pytest.raises(ArtifactError, match="not among the files"):
        prepare_model(str(tmp_path / "base"), str(tmp_path / "routers"))


def test_prepare_model_restores_a_baseline_policy(tmp_path, tokenizer):
    """A ShortGPT directory's router weights are the untrained init; evaluating it must use its saved keep mask."""
    from skipgpt import save_routers
    from skipgpt.baselines import shortgpt
    from skipgpt.evaluation.harness import prepare_model

    base = tiny_lm(len(tokenizer), seed=4)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    texts = ["The river runs past the old mill.", "A cat sat on the warm stone wall."]
    routed = shortgpt(RoutedModel(base, SkipConfig(), name=str(tmp_path / "base")), tokenizer, 0.25, texts)
    save_routers(routed, tmp_path / "shortgpt")
    ids = torch.tensor([tokenizer(texts[0]).input_ids])
    with torch.no_grad():
        want = routed(input_ids=ids).logits
        routed.unpatch()
        dense = base(input_ids=ids).logits
    loaded, _ = prepare_model(str(tmp_path / "base"), str(tmp_path / "shortgpt"), mode="sparse")
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert not loaded.decisions().all()
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, dense, atol=1e-3)


def test_sparse_mode_scores_like_masked_mode(model, tokenizer):
    """--mode only switches the execution path; the same decisions give the same log-likelihoods."""
    routed = RoutedModel(model, SkipConfig())
    data = load_task("arc_easy", FIX / "arc_easy")
    got = {}
    try:
        routed.force(hidden_sign_policy)
        for mode in ("masked", "sparse"):
            routed.set_mode(mode)
            routed.reset_sparsity()
            result = run_task(SkipGPTLM(routed, tokenizer=tokenizer, batch_size=4), build_task(data), log_samples=True)
            ll = flat([[r[0][0] for r in s["resps"]] for s in sorted(result["samples"], key=lambda s: s["doc_id"])])
            got[mode] = (ll, routed.sparsity().param)
    finally:
        routed.unpatch()
    assert got["sparse"][0] == pytest.approx(got["masked"][0], abs=1e-3)
    assert got["sparse"][1] == pytest.approx(got["masked"][1]) and got["masked"][1] > 0


def test_plain_lm_eval_finds_the_skipgpt_model_in_a_fresh_interpreter(tmp_path):
    """What `lm_eval --model skipgpt --model_args pretrained=...` does, in a process that never imported
    skipgpt: the installed skipgpt-lm-eval.pth registers the model lazily, stock models still resolve."""
    import subprocess
    import sys

    from skipgpt import RoutedModel, save_routers
    from skipgpt.models.loading import load_model

    from conftest import save_tiny_llama

    save_tiny_llama(tmp_path / "m", layers=2)
    save_routers(RoutedModel(load_model(str(tmp_path / "m"))[0]), tmp_path / "r")
    code = (
        "import sys\n"
        "heavy = [m for m in ('skipgpt', 'torch', 'lm_eval') if m in sys.modules]\n"
        "from lm_eval.api.registry import get_model\n"
        "cls = get_model('skipgpt')\n"
        f"lm = cls.create_from_arg_string('pretrained={tmp_path / 'm'},routers={tmp_path / 'r'},mode=sparse', {{}})\n"
        "import importlib.resources\n"  # the watched package keeps its loader's other services
        "found = importlib.resources.files('lm_eval.models').joinpath('huggingface.py').is_file()\n"
        "print(heavy, cls.__module__, type(lm.routed).__name__, lm.routed.mode, get_model('hf').__name__, found)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-6:] == ["[]", "skipgpt.evaluation.harness", "RoutedModel", "sparse", "HFLM", "True"]
    # the documented `python -m skipgpt.evaluation.harness`: the script copy must not register a second class
    out = subprocess.run([sys.executable, "-m", "skipgpt.evaluation.harness", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--model" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("extra, says", [(",routers=ROOT/nowhere", "router directory .*nowhere does not exist"),
                                         (",router=ROOT/r", "unknown model_args 'router'")])
def test_skipgpt_lm_eval_refuses_bad_model_args_in_one_line(extra, says, tmp_path, capsys, monkeypatch):
    """skipgpt's own console script gave a traceback and exit status 1 for a routers= folder that is not one."""
    import sys

    from skipgpt.evaluation.harness import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets the harness's command line there

    save_tiny_llama(tmp_path / "m", layers=2)
    model_args = f"pretrained={tmp_path / 'm'}" + extra.replace("ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(["run", "--model", "skipgpt", "--model_args", model_args, "--tasks", "piqa", "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipgpt-lm-eval")]
    assert info.value.code == 2 and len(err) == 1 and re.search(says, err[0]), err
