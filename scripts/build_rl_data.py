"""Build the demo RL prompts in ``distill/assets/data`` from the words of the bundled conversations.

A verifiable task the tiny demo policy can learn on a CPU in minutes: each prompt asks for one word
back, in one of :data:`PHRASINGS`, and its ``answer`` is that word (``{"question", "answer"}``, the
MedicalGPT GRPO format). The words are the most frequent alphabetic words of ``chat_train.jsonl``;
``rl_val.jsonl`` holds (word, phrasing) combinations that ``rl_train.jsonl`` never shows, so a rising
held-out reward means the policy learned to read the word from the prompt, not a list of answers.

Usage::

    python scripts/build_rl_data.py

Deterministic: a rebuild gives byte-identical files. Provenance and licenses: ``distill/assets/NOTICE.md``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "distill" / "assets" / "data"
SEED = 1234
NUM_WORDS = 64
VAL_SHARE = 0.1
PHRASINGS = (
    "Repeat the word: {word}",
    "Say {word}.",
    "Reply with one word: {word}",
    "Type the word {word} and nothing else.",
    "Echo this word: {word}",
    "Answer with the word {word}.",
    "Write {word}.",
    "Just say {word}",
)


# token F1 (SQuAD's) ignores articles: "the" as an answer would reward an empty completion
ARTICLES = frozenset({"a", "an", "the"})


def frequent_words(path: Path, count: int) -> list[str]:
    """The ``count`` most frequent lowercase alphabetic words of 3-9 letters in the conversations,
    articles left out."""
    counter: Counter[str] = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        for message in json.loads(line)["messages"]:
            counter.update(
                w
                for w in re.findall(r"[a-z]+", message["content"].lower())
                if 3 <= len(w) <= 9 and w not in ARTICLES
            )
    return [word for word, _ in counter.most_common(count)]


def main() -> None:
    words = frequent_words(DATA / "chat_train.jsonl", NUM_WORDS)
    combos = [(word, phrasing) for word in words for phrasing in PHRASINGS]
    rng = random.Random(SEED)
    rng.shuffle(combos)
    n_val = round(len(combos) * VAL_SHARE)
    for split, part in (("val", combos[:n_val]), ("train", combos[n_val:])):
        rows = [{"question": phrasing.format(word=word), "answer": word} for word, phrasing in part]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (DATA / f"rl_{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"rl_{split}.jsonl: {len(rows)} prompts")


if __name__ == "__main__":
    main()
