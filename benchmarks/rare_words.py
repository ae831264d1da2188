"""Where a routed model loses WikiText-2 perplexity: the words the tokenized release replaces by <unk>.

    python benchmarks/rare_words.py --data DIR --routers runs/wt2-rt25            # 40 windows, CPU
    python benchmarks/rare_words.py --data DIR --routers R --lora R/adapter --limit 10

DIR holds `wiki.test.raw` and `wiki.test.tokens`. The two files have the same lines and the same
words, except that the tokenized one writes every word outside its 33k vocabulary as `<unk>`. Router
tuning on `wiki.valid.tokens` (there is no raw validation file here) therefore never sees those words,
and does see thousands of `<unk>`. This script scores the dense model and the routed one (sparse mode)
on the `skipgpt eval` windows of both files, as `skipgpt eval --task wikitext2=...` does, and splits
every scored token by whether it lies in such a word: in the raw file the real rare word, in the
tokenized file the `<unk>` itself. It prints each part's perplexity, dense and routed side by side,
their ratio, and the share of the routed model's extra negative log-likelihood each part carries.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from skipgpt.evaluation.harness import prepare_model
from skipgpt.evaluation.perplexity import tokenize_text
from skipgpt.evaluation.tasks import load_perplexity_text, read_text
from skipgpt.io import write_json_atomic


def release_lines(path: Path) -> list[str]:
    lines = read_text(path).split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def unk_char_mask(text: str, own: list[str], tokenized: list[str]) -> torch.Tensor:
    """Boolean per character of `text` (the eval's joined text of the file whose lines are `own`): True
    inside every word that is `<unk>` at the same place of the tokenized release. A line whose word count
    differs between the two files (two in the test split) is left unmarked."""
    if len(own) != len(tokenized):
        raise SystemExit(f"the raw and tokenized files have {len(own)} and {len(tokenized)} lines")
    mask = torch.zeros(len(text), dtype=torch.bool)
    pos = 0
    for line, tline in zip(own, tokenized):
        # Same row layout as load_perplexity_text: a row is the line plus its newline, "" if blank,
        # and rows are joined with "\n\n".
        row = line + "\n" if line.strip() else ""
        if text[pos : pos + len(row)] != row:
            raise SystemExit("the joined test text does not follow the release lines; cannot align words")
        words, twords = line.split(" "), tline.split(" ")
        if row and len(words) == len(twords):
            c = pos
            for word, tword in zip(words, twords):
                if tword == "<unk>":
                    mask[c : c + len(word)] = True
                c += len(word) + 1
        pos += len(row) + 2
    return mask


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, seq_len: int, windows: int) -> torch.Tensor:
    """(windows, seq_len - 1) per-target NLL on the eval's non-overlapping windows."""
    out = []
    for w in range(windows):
        x = ids[w * seq_len : (w + 1) * seq_len][None]
        logits = model(input_ids=x).logits
        out.append(F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="none").double())
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with wiki.test.raw and wiki.test.tokens")
    ap.add_argument("--routers", required=True, help="router directory from `skipgpt train`")
    ap.add_argument("--lora", default=None, help="LoRA adapter folder, merged after the routers")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=40, help="first N windows of each file (default 40)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    files = {"raw": data / "wiki.test.raw", "tokens": data / "wiki.test.tokens"}
    for path in files.values():
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (both wiki.test.raw and wiki.test.tokens are needed)")

    dense, tokenizer = prepare_model(args.model)
    routed, _ = prepare_model(args.model, args.routers, args.lora, "sparse")
    tokenized = release_lines(files["tokens"])
    report: dict[str, dict] = {}
    for kind, path in files.items():
        text = load_perplexity_text("wikitext2", path)
        chars = unk_char_mask(text, release_lines(path), tokenized)
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        ids = tokenize_text(tokenizer, text)
        if enc["input_ids"] != ids.tolist():
            raise SystemExit("the tokenizer's offsets do not belong to the eval's token ids")
        in_unk = torch.tensor([bool(chars[a:b].any()) for a, b in enc["offset_mapping"]])
        windows = min(args.limit, ids.numel() // args.seq_len)
        flag = in_unk[: windows * args.seq_len].view(windows, args.seq_len)[:, 1:]
        nll_d = window_nll(dense, ids, args.seq_len, windows)
        nll_r = window_nll(routed, ids, args.seq_len, windows)
        extra = float((nll_r - nll_d).sum())
        rows = {}
        for part, mask in (("all", torch.ones_like(flag)), ("<unk> words", flag), ("other words", ~flag)):
            d, r = math.exp(float(nll_d[mask].mean())), math.exp(float(nll_r[mask].mean()))
            rows[part] = {"tokens": int(mask.sum()), "dense_ppl": d, "routed_ppl": r, "ratio": r / d,
                          "share_of_extra_nll": float((nll_r - nll_d)[mask].sum()) / extra}
        report[kind] = rows
        print(f"\n{path.name}: {windows} windows of {args.seq_len} tokens")
        print(f"{'tokens in':<14}{'count':>8}{'dense PPL':>11}{'routed PPL':>12}{'x dense':>9}{'extra NLL':>11}")
        for part, row in rows.items():
            print(f"{part:<14}{row['tokens']:>8}{row['dense_ppl']:>11.2f}{row['routed_ppl']:>12.2f}"
                  f"{row['ratio']:>9.2f}{row['share_of_extra_nll']:>11.1%}")
    if args.output:
        write_json_atomic(args.output, {"routers": args.routers, "lora": args.lora, **report})


if __name__ == "__main__":
    main()
