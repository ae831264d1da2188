"""A WikiText release file as the prose it was made from, to train or evaluate on ordinary text.

    python benchmarks/prose.py ../shared/data/wikitext2/wiki.test.raw prose/test.txt

The release files space out punctuation and joiners ("state @-@ of @-@ the @-@ art , isn 't it ( 1 @,@ 000 )");
this writes "state-of-the-art, isn 't it (1,000)". `<unk>` and single quotes (quote or apostrophe: ambiguous)
stay as they are; "= = Heading = =" becomes wiki markup "== Heading ==". Pass the output to `skipgpt eval
--task wikitext2=prose/test.txt` (the name test.txt is what the wikitext2 task reads) or to `--data`. Used for
docs/RESULTS.md's row on the text format informed skipping learns.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

RULES = (
    (re.compile(r" @([-,.])@ "), r"\1"),  # joiners: 1 @,@ 000 -> 1,000
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[{$]) "), r"\1"),  # nor after an opening one
    (re.compile(r" (n't|'s|'re|'ve|'m|'ll|'d)\b"), r"\1"),  # clitics: it 's -> it's (not "didn 't": as measured)
    (re.compile(r'" (.*?) "'), r'"\1"'),  # double quotes hug their text
    (re.compile(r"^ = = = (.*) = = = $", re.M), r" === \1 === "),  # headings as wiki markup
    (re.compile(r"^ = = (.*) = = $", re.M), r" == \1 == "),
)


def prose(text: str) -> str:
    for pattern, replacement in RULES:
        text = pattern.sub(replacement, text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="wiki.*.tokens or wiki.*.raw")
    p.add_argument("output", type=Path)
    args = p.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(prose(args.source.read_text(encoding="utf-8")), encoding="utf-8")


if __name__ == "__main__":
    main()
