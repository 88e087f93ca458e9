"""Build the demo preference data in ``distill/assets/data`` from the bundled chat conversations.

Every assistant turn of ``chat_train.jsonl`` (``chat_val.jsonl``) gives one pair in ``pref_train.jsonl``
(``pref_val.jsonl``): the prompt is every turn before it, ``chosen`` the real answer and ``rejected`` a
worse answer of one of :data:`KINDS`, picked by a seeded RNG. ``kto_*.jsonl`` hold the same pairs as two
unpaired records each (the chosen answer desirable, the rejected one undesirable).

Usage::

    python scripts/build_preference_data.py

Deterministic: a rebuild from the same conversations gives byte-identical files. Provenance and
licenses: ``distill/assets/NOTICE.md``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "distill" / "assets" / "data"
SEED = 1234
SPLITS = ("train", "val")
FROM = {"user": "human", "assistant": "gpt"}  # OpenAI role -> MedicalGPT/ShareGPT "from"

Message = dict[str, str]
Pair = dict[str, object]


def _norm(text: str) -> str:
    return " ".join(text.split())


def off_topic(answer: str, pool: list[str], rng: random.Random) -> str:
    """The answer to another random question of the same split."""
    others = [a for a in pool if _norm(a) != _norm(answer)]
    return rng.choice(others) if others else answer


def word_salad(answer: str, pool: list[str], rng: random.Random) -> str:
    """The real answer with its words shuffled (line breaks are lost)."""
    words = answer.split()
    shuffled = words[:]
    rng.shuffle(shuffled)
    if shuffled == words:  # short answers often shuffle back into place
        shuffled = words[1:] + words[:1]
    return " ".join(shuffled)


def truncated(answer: str, pool: list[str], rng: random.Random) -> str:
    """The real answer cut after its first few words (at most a third of them)."""
    ends = [m.end() for m in re.finditer(r"\S+", answer)]
    keep = rng.randint(1, max(1, min(12, len(ends) // 3)))
    return answer[: ends[keep - 1]]


def repetition(answer: str, pool: list[str], rng: random.Random) -> str:
    """The real answer with one of its sentences repeated 2-4 extra times in place."""
    parts = re.split(r"(?<=[.!?])(\s+)", answer)  # sentences at even indices, kept separators between
    i = rng.choice([j for j in range(0, len(parts), 2) if parts[j].strip()])
    parts[i] = " ".join([parts[i]] * (1 + rng.randint(2, 4)))
    return "".join(parts)


KINDS: dict[str, Callable[[str, list[str], random.Random], str]] = {
    "off_topic": off_topic,
    "word_salad": word_salad,
    "truncated": truncated,
    "repetition": repetition,
}


def reject(answer: str, pool: list[str], rng: random.Random) -> tuple[str, str]:
    """A (kind, rejected answer) differing from ``answer``; falls back through the other kinds."""
    first = rng.choice(list(KINDS))
    rest = [k for k in KINDS if k != first]
    rng.shuffle(rest)
    for kind in [first, *rest]:
        rejected = KINDS[kind](answer, pool, rng)
        if _norm(rejected) and _norm(rejected) != _norm(answer):
            return kind, rejected
    raise ValueError(f"no rejected answer differs from {answer!r}")  # repetition always differs


def read_conversations(path: Path) -> Iterator[list[Message]]:
    """The messages of each conversation, roles checked (errors name ``path:line``)."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            source = f"{path}:{n}"
            messages = json.loads(line)["messages"]
            roles = [m["role"] for m in messages]
            body = roles[1:] if roles[:1] == ["system"] else roles
            if not body or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(body)):
                raise ValueError(f"{source}: expected [system], user, assistant, user, ...; got {roles}")
            yield messages


def build_pairs(path: Path, rng: random.Random) -> list[Pair]:
    """One pair per non-empty assistant turn of the conversations in ``path``."""
    conversations = list(read_conversations(path))
    pool = [m["content"] for ms in conversations for m in ms if m["role"] == "assistant"]
    pool = [a for a in pool if a.strip()]
    pairs: list[Pair] = []
    for messages in conversations:
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        for i, message in enumerate(turns):
            if message["role"] != "assistant" or not message["content"].strip():
                continue
            kind, rejected = reject(message["content"], pool, rng)
            pair: Pair = {
                "conversations": [{"from": FROM[m["role"]], "value": m["content"]} for m in turns[:i]]
            }
            if system is not None:
                pair["system"] = system
            pair.update(chosen=message["content"], rejected=rejected, rejected_kind=kind)
            pairs.append(pair)
    return pairs


def kto_records(pair: Pair) -> list[dict[str, object]]:
    """The desirable (chosen) and undesirable (rejected) KTO records of one pair."""
    role = {v: k for k, v in FROM.items()}
    prompt = [{"role": role[t["from"]], "content": t["value"]} for t in pair["conversations"]]
    system = {"system": pair["system"]} if "system" in pair else {}
    return [
        {"prompt": prompt, **system, "completion": pair["chosen"], "label": True},
        {
            "prompt": prompt,
            **system,
            "completion": pair["rejected"],
            "label": False,
            "rejected_kind": pair["rejected_kind"],
        },
    ]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    for split in SPLITS:
        pairs = build_pairs(DATA / f"chat_{split}.jsonl", random.Random(SEED))  # one RNG per split
        kto = [record for pair in pairs for record in kto_records(pair)]
        write_jsonl(DATA / f"pref_{split}.jsonl", pairs)
        write_jsonl(DATA / f"kto_{split}.jsonl", kto)
        kinds = Counter(pair["rejected_kind"] for pair in pairs)
        shares = ", ".join(f"{k} {kinds[k]} ({kinds[k] / len(pairs):.0%})" for k in KINDS)
        labels = Counter(r["label"] for r in kto)
        print(f"pref_{split}.jsonl: {len(pairs)} pairs; rejected: {shares}")
        print(
            f"kto_{split}.jsonl: {len(kto)} records ({labels[True]} desirable, {labels[False]} undesirable)"
        )


if __name__ == "__main__":
    main()
