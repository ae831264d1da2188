"""A multiple-choice task's items as running text (question, then the right answer), to score routers on it as
perplexity: how much of what they lose on WikiText they lose on the text the tasks are made of.

    python benchmarks/task_text.py piqa ../shared/data/piqa piqa/test.txt --skip 500
    skipgpt eval --routers DIR --task wikitext2=piqa/test.txt --windows 10

One item per line: PIQA's goal and right solution, ARC's question and right answer, HellaSwag's context and right
ending. `--skip N` leaves out the first N items (those a `--limit N` evaluation scores). The name test.txt is what
the wikitext2 task reads. Used for docs/RESULTS.md's row on informed skipping off WikiText.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from skipgpt.evaluation.tasks import choices_and_gold, load_task

CONTEXT = {"piqa": "goal", "arc_easy": "question", "arc_challenge": "question", "hellaswag": "ctx"}


def item_text(name: str, doc: dict) -> str:
    choices, gold = choices_and_gold(name, doc)
    context = doc.get("query", doc.get(CONTEXT[name], ""))  # the llama.cpp HellaSwag file has the prompt as query
    return f"{context} {choices[gold]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(CONTEXT))
    parser.add_argument("data", help="the task's release file or folder, as `skipgpt eval --task` takes it")
    parser.add_argument("output", type=Path)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N items")
    args = parser.parse_args()
    docs = load_task(args.task, args.data).docs[args.skip:]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(item_text(args.task, d) + "\n" for d in docs), encoding="utf-8")
    print(f"wrote {len(docs)} items to {args.output}")


if __name__ == "__main__":
    main()
