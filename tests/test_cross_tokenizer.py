"""KD across tokenizers, part 1: the vocabulary map, alignment through the text, and the projection of a
teacher's rows into the student's vocabulary, on the two real bundled tokenizers (Mistral's
SentencePiece and GPT-2's byte-level BPE)."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from distill.data.encoding import encode_record
from distill.data.formats import to_record
from distill.data.templates import TemplateError, resolve_template
from distill.losses.kd import log_tail_mass
from distill.pretrained import load_tokenizer
from distill.targets import SparseTargets
from distill.teacher.cross import TextAxis
from distill.teacher.identity import tokenizer_hash
from distill.teacher.module import Teacher, TeacherModule
from distill.teacher.projection import EXACT, MERGED, UNALIGNED, cross_targets, merge_span, project
from distill.teacher.spans import align_spans, byte_spans
from distill.teacher.sparse import sparse_distribution
from distill.teacher.vocab_map import build_vocab_map, token_bytes
from tests.helpers import (
    GPT2_TOKENIZER_DIR,
    TINY_LLAMA,
    TOKENIZER_DIR,
    clean_env,
    conversation,
    kd_config,
    losses,
    losses_named,
    run,
)


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer(str(GPT2_TOKENIZER_DIR))


_token_bytes = functools.cache(token_bytes)  # one read of each vocabulary per test session


def encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and byte spans of ``text`` (no BOS)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    table = _token_bytes(tokenizer)
    pieces = [None if table[i] is None else table[i][0] for i in enc["input_ids"]]
    return enc["input_ids"], byte_spans(text, enc["offset_mapping"], pieces)


def random_rows(n: int, vocab: int, k: int, seed: int = 0) -> SparseTargets:
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 4
    ids, head, lse, _, _ = sparse_distribution(logits, k)
    return SparseTargets(ids, head, lse)


def test_the_gpt2_tokenizer_ships_loads_and_gives_offsets(gpt2):
    assert len(gpt2) == 50257 and gpt2.eos_token == gpt2.pad_token == "<|endoftext|>"
    enc = gpt2("Hello world, it's 2024!", return_offsets_mapping=True)
    assert enc["input_ids"] == [15496, 995, 11, 340, 338, 48609, 0]  # tiktoken's "gpt2" ids
    assert enc["offset_mapping"][:2] == [(0, 5), (5, 11)]
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    template = resolve_template(gpt2)  # its own chat template, as a teacher's template "model" reads it
    text, spans = template.render_with_spans(gpt2, chat)
    assert text == "User: Hi\nAssistant: Hello.<|endoftext|>\n"
    assert [text[a:b] for a, b in spans] == [" Hello.<|endoftext|>"]


def test_vocab_map_matches_tokens_by_their_bytes(gpt2, mistral):
    to_mistral = build_vocab_map(gpt2, mistral)
    assert to_mistral.shape == (50257,) and to_mistral.dtype == torch.long

    def mapped(token: str) -> str | None:
        assert token in gpt2.get_vocab()
        student = int(to_mistral[gpt2.convert_tokens_to_ids(token)])
        return None if student < 0 else mistral.convert_ids_to_tokens(student)

    agree = {
        "Ġworld": "▁world",  # GPT-2's spelled space and SentencePiece's
        "ized": "ized",
        "ĠcafÃ©": "▁café",  # two bytes of é in GPT-2's alphabet, one character in SentencePiece
        "Ċ": "<0x0A>",  # SentencePiece has no newline piece: its byte-fallback token
        "¥": "<0xA5>",  # a lone continuation byte
        "Ġ": "▁",
        "<|endoftext|>": "</s>",  # EOS by role
    }
    assert {t: mapped(t) for t in agree} == agree
    assert [mapped(t) for t in ("Ġunbelievably", "ĠnaÃ¯ve", "Ġæ")] == [None, None, None]
    to_gpt2 = build_vocab_map(mistral, gpt2)
    back = {
        m: gpt2.convert_ids_to_tokens(int(to_gpt2[mistral.convert_tokens_to_ids(m)])) for m in agree.values()
    }
    assert back == {v: k for k, v in agree.items()}
    assert to_gpt2[mistral.convert_tokens_to_ids("<0xE6>")] == gpt2.convert_tokens_to_ids("æ")
    assert [int(to_gpt2[i]) for i in (0, 1)] == [-1, -1]  # <unk>, <s>: no role in common


def test_vocab_map_of_a_tokenizer_with_itself_is_the_identity(gpt2, mistral):
    for tokenizer in (gpt2, mistral):  # SentencePiece's "A" and "<0x41>" share bytes: each keeps its own id
        assert torch.equal(build_vocab_map(tokenizer, tokenizer), torch.arange(len(tokenizer)))


def test_byte_spans_split_characters_and_drop_sentencepiece_dummy_space(gpt2, mistral):
    ids, spans = encode(gpt2, "日本 x")
    assert gpt2.convert_ids_to_tokens(ids) == ["æĹ", "¥", "æľ", "¬", "Ġx"]
    assert spans == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8)]  # char offsets give (0, 3) to the first two
    ids, spans = encode(mistral, "日本 x")
    assert mistral.convert_ids_to_tokens(ids) == ["▁", "日", "本", "▁x"]
    assert spans == [(0, 0), (0, 3), (3, 6), (6, 8)]  # the leading ▁ is not in the text


def test_alignment_groups_where_boundaries_differ(gpt2, mistral):
    text = "The tokenizer splits unbelievably  long words."
    student, student_spans = encode(mistral, text)
    teacher, teacher_spans = encode(gpt2, text)
    groups = align_spans(student_spans, teacher_spans)
    shown = [
        (
            mistral.convert_ids_to_tokens([student[i] for i in g.student]),
            gpt2.convert_ids_to_tokens([teacher[i] for i in g.teacher]),
            g.exact,
        )
        for g in groups
    ]
    assert shown == [
        (["▁The"], ["The"], True),
        (["▁token"], ["Ġtoken"], True),
        (["izer"], ["izer"], True),
        (["▁spl", "its"], ["Ġsplits"], False),
        (["▁un", "bel", "iev", "ably"], ["Ġunbelievably"], False),
        (["▁▁", "long"], ["Ġ", "Ġlong"], False),  # the extra space: SentencePiece keeps it with the first
        (["▁words"], ["Ġwords"], True),
        (["."], ["."], True),
    ]


def test_alignment_skips_empty_spans_and_groups_leftovers():
    groups = align_spans([(0, 0), (0, 2), (2, 5), (5, 9)], [(0, 2), (2, 2), (2, 4), (4, 5)])
    assert [(g.student, g.teacher, g.exact) for g in groups] == [
        ((1,), (0,), True),
        ((2,), (2, 3), False),
        ((3,), (), False),  # the teacher ended early
    ]


@pytest.mark.parametrize("name", ["mistral", "gpt2"])
def test_same_tokenizer_gives_exactly_the_teachers_rows(name, request):
    tokenizer = request.getfixturevalue(name)
    text = "The tokenizer splits unbelievably  long words, naïvely: 日本!"
    ids, spans = encode(tokenizer, text)
    groups = align_spans(spans, spans)
    assert all(g.exact for g in groups) and len(groups) == len(ids)
    rows = random_rows(len(ids), len(tokenizer), k=8)
    rows.ids[0, -1], rows.logits[0, -1] = rows.ids[0, -2], -math.inf  # a padded slot passes through too
    identity = build_vocab_map(tokenizer, tokenizer)
    out = cross_targets(groups, ids, ids, rows, identity)
    assert (out.source == EXACT).all()
    assert torch.equal(out.targets.ids, rows.ids)
    assert torch.equal(out.targets.logits, rows.logits)
    assert torch.equal(out.targets.lse, rows.lse)


def test_projection_keeps_mapped_mass_and_moves_the_rest_to_the_tail():
    # teacher vocabulary of 6 into a student's of 4: 3 unmapped, 1 and 4 the same student token
    vocab_map = torch.tensor([2, 0, -1, 3, 0, -1])
    logits = torch.tensor([[0.5, 1.0, 2.0, -1.0, 0.0, 0.3], [3.0, -2.0, 0.0, 1.0, 1.5, -0.5]])
    ids, head, lse, _, _ = sparse_distribution(logits, k=5)  # both rows hold teacher ids 1 and 4
    rows = SparseTargets(ids, head, lse)
    out = project(rows, vocab_map)
    for r in range(2):  # student id 0 once (the losses read the student's head mass by id)
        kept = out.ids[r][torch.isfinite(out.logits[r])].tolist()
        assert kept == sorted(set(kept)) and 0 in kept
    probs = logits.softmax(-1)
    for r in range(2):
        expected = torch.zeros(4)
        for t in ids[r].tolist():
            if vocab_map[t] >= 0:
                expected[vocab_map[t]] += probs[r, t]
        got = torch.zeros(4).index_add_(0, out.ids[r], (out.logits[r] - out.lse[r]).exp())
        torch.testing.assert_close(got, expected)
    total = (out.logits - out.lse[:, None]).exp().sum(-1) + log_tail_mass(out).exp()
    torch.testing.assert_close(total, torch.ones(2))  # mapped + tail = 1
    assert (out.ids.diff(dim=-1) >= 0).all()  # ascending, padding behind the last id


def test_merged_span_gives_the_student_token_the_paths_probability(gpt2, mistral):
    # student GPT-2 ("Ġunbelievably", one token), teacher SentencePiece (four)
    to_gpt2 = build_vocab_map(mistral, gpt2)
    text = "so unbelievably"
    student, student_spans = encode(gpt2, text)
    teacher, teacher_spans = encode(mistral, text)
    groups = align_spans(student_spans, teacher_spans)
    assert [(len(g.student), len(g.teacher)) for g in groups] == [(1, 1), (1, 4)]
    rows = random_rows(len(teacher), len(mistral), k=16, seed=1)
    for j, token in enumerate(teacher):  # the actual tokens in their rows' heads
        if token not in rows.ids[j]:
            rows.ids[j, 0] = token
            rows.ids[j], order = rows.ids[j].sort()
            rows.logits[j] = rows.logits[j][order]
    out = cross_targets(groups, student, teacher, rows, to_gpt2)
    assert out.source.tolist() == [UNALIGNED, MERGED]  # "so" vs "▁so": SentencePiece's dummy space
    path = sum(float(rows.logits[j][rows.ids[j] == teacher[j]] - rows.lse[j]) for j in range(1, 5))
    merged = out.targets
    at_target = merged.logits[1][merged.ids[1] == student[1]]
    torch.testing.assert_close(torch.logsumexp(at_target, 0) - merged.lse[1], torch.tensor(path))
    mass = (merged.logits[1] - merged.lse[1]).exp().sum()
    assert 0 < float(mass) <= 1 and float(out.mapped_mass[1]) == pytest.approx(float(mass))
    rows.logits[3][rows.ids[3] == teacher[3]] = -math.inf  # an actual token outside its row's head
    assert cross_targets(groups, student, teacher, rows, to_gpt2).source.tolist() == [UNALIGNED, UNALIGNED]


def test_several_student_tokens_against_one_teacher_token_are_unaligned(gpt2, mistral):
    text = "The tokenizer splits"
    student, student_spans = encode(mistral, text)
    teacher, teacher_spans = encode(gpt2, text)
    rows = random_rows(len(teacher), len(gpt2), k=4)
    out = cross_targets(
        align_spans(student_spans, teacher_spans), student, teacher, rows, build_vocab_map(gpt2, mistral)
    )
    # "▁The" vs "The": the same bytes, but SentencePiece's token has its dummy space ("The" maps to "The");
    # "▁spl" "its" vs "Ġsplits": the teacher never predicted the boundary inside "splits"
    assert out.source.tolist() == [UNALIGNED, EXACT, EXACT, UNALIGNED, UNALIGNED]
    assert out.mapped_mass[3:].tolist() == [0.0, 0.0] and out.mapped_mass[1] > 0
    assert torch.isinf(out.targets.logits[3:]).all()


def test_sampled_rows_are_refused_with_the_way_out():
    rows = SparseTargets(
        torch.zeros(1, 0, dtype=torch.long),
        torch.zeros(1, 0),
        torch.zeros(1),
        torch.zeros(1, 2, dtype=torch.long),
        torch.ones(1, 2, dtype=torch.int32),
    )
    with pytest.raises(ValueError, match=r"sparsity\.scheme: topk"):
        project(rows, torch.arange(4))
    with pytest.raises(ValueError, match=r"sparsity\.scheme: topk"):
        merge_span(
            rows,
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1),
            torch.zeros(1, dtype=torch.long),
            torch.arange(4),
        )


# ---- part 2: a cache in the teacher's own terms trains students of other tokenizers -------------------


def _cross_fit(tmp_path, teacher: dict, name: str, student_tokenizer=TOKENIZER_DIR, n: int = 8, **data):
    """A 3-step KD fit of a tiny student on ``n`` conversations, the cache under ``tmp_path / 'cache'``
    (shared by the fits of one test), its logs under ``tmp_path / name``."""
    tmp_path.mkdir(exist_ok=True)
    config = yaml.safe_load(kd_config(tmp_path, Path("unused"), n=n).read_text())
    config["trainer"].update(max_steps=3, val_check_interval=3, default_root_dir=str(tmp_path / name))
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / name)
    config["model"]["init_args"]["tokenizer"] = str(student_tokenizer)
    config["data"]["init_args"].update(teachers=[teacher], max_seq_length=256, **data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return run(["fit", "--config", str(path)], clean_env())


GPT2_TEACHER = {"model_config": TINY_LLAMA, "name": "g", "tokenizer": str(GPT2_TOKENIZER_DIR)}


def test_one_collection_in_the_teachers_terms_trains_students_of_two_tokenizers(tmp_path):
    first = _cross_fit(tmp_path, GPT2_TEACHER, "mistral")
    spec = json.loads((tmp_path / "cache" / "train" / "cache.json").read_text())
    assert spec["teacher_terms"] is True and spec["vocab_size"] == 50257
    assert spec["tokenizer_hash"] == tokenizer_hash(load_tokenizer(str(GPT2_TOKENIZER_DIR)))
    assert "collect {g: 8}" in first.stderr
    log = re.search(r"teacher g \(another tokenizer\) on 6 val samples: ([\d.]+)% .*aligned", first.stderr)
    assert log is not None and 0 < float(log.group(1)) < 100, first.stderr[-3000:]
    shares = losses_named(tmp_path / "mistral", "train/aligned_share")
    assert len(shares) == 3 and all(0 < s < 1 for s in shares.values())
    assert 0 < losses_named(tmp_path / "mistral", "val/mapped_mass")[2] <= 1
    assert all(math.isfinite(v) for v in losses(tmp_path / "mistral").values())
    # a student of GPT-2's own tokenizer reads the same collection: nothing is collected again, and
    # every position aligns exactly (the same tokenizer and template as the teacher's)
    second = _cross_fit(tmp_path, GPT2_TEACHER, "gpt2", student_tokenizer=GPT2_TOKENIZER_DIR)
    assert "collected 0 samples" in second.stderr
    assert set(losses_named(tmp_path / "gpt2", "train/aligned_share").values()) == {1.0}


def test_a_teacher_of_the_same_tokenizer_through_the_cross_path_trains_exactly_as_today(tmp_path):
    """In chunked mode (a disk budget of a few samples' targets), so chunks collect in the teacher's terms."""
    teacher, budget = {"model_config": TINY_LLAMA, "name": "t"}, {"cache_size_gb": 4.5e-5}
    _cross_fit(tmp_path / "same", teacher, "today", **budget)
    crossed = _cross_fit(tmp_path / "cross", {**teacher, "tokenizer": str(TOKENIZER_DIR)}, "cross", **budget)
    assert re.search(r"chunked KD: .* [2-9] chunks per epoch", crossed.stderr), crossed.stderr[-3000:]
    spec = json.loads((tmp_path / "cross" / "cache" / "val" / "cache.json").read_text())
    assert spec["teacher_terms"] is True
    today, crossed = losses(tmp_path / "same" / "today"), losses(tmp_path / "cross" / "cross")
    assert len(today) == 3 and crossed == today  # bit for bit
    for name in ("train/kd", "val/loss"):
        assert losses_named(tmp_path / "cross" / "cross", name) == losses_named(
            tmp_path / "same" / "today", name
        )
    assert set(losses_named(tmp_path / "cross" / "cross", "train/aligned_share").values()) == {1.0}


def test_a_slow_teacher_tokenizer_is_refused_naming_the_teacher():
    from transformers import PythonBackend

    class Characters(PythonBackend):
        """A tokenizer in pure Python, without offsets: one token per ASCII character."""

        vocab_size = 128

        def get_vocab(self) -> dict[str, int]:
            return {chr(i): i for i in range(128)}

        def _tokenize(self, text: str) -> list[str]:
            return list(text)

        def _convert_token_to_id(self, token: str) -> int:
            return ord(token) % 128

        def _convert_id_to_token(self, index: int) -> str:
            return chr(index)

    with pytest.raises(ValueError, match=r"teacher 'g'.*slow \(Python\) tokenizer without offsets"):
        TextAxis(Characters(), None, "teacher 'g'")


def test_a_teacher_template_that_cannot_render_the_conversation_is_an_error_naming_the_teacher(mistral):
    refuses_system = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns') }}"
        "{% endif %}{{ m.content }}<|endoftext|>{% endfor %}"
    )
    teacher = Teacher(model_config=TINY_LLAMA, name="g", tokenizer=str(GPT2_TOKENIZER_DIR))
    teacher.template, teacher.end_of_turn = refuses_system, "<|endoftext|>"
    module = TeacherModule([teacher], tokenizer=str(TOKENIZER_DIR))
    template = resolve_template(mistral, "mistral")
    sample = encode_record(to_record(conversation(1), "data.jsonl:1"), mistral, template)
    with pytest.raises(
        TemplateError, match=r"teacher 'g': template 'custom' cannot render data.jsonl:1.*no system"
    ):
        module.prepare_jobs([(0, [sample])], template)


def test_unaligned_positions_train_on_the_hard_label_alone():
    """A placeholder row (no teacher distribution) contributes its CE in full, whatever alpha, and no KD;
    aligned rows give exactly what they give without the mask."""
    from distill.objectives.kd import Distillation
    from distill.targets import BatchTargets
    from tests.helpers import token_inputs

    torch.manual_seed(0)
    vocab, hidden_size, positions = 40, 16, 6
    hidden = torch.randn(positions, hidden_size)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    labels = torch.randint(0, vocab, (positions,))
    ids, logits, lse, _, _ = sparse_distribution(torch.randn(positions, vocab) * 3, k=8)
    aligned = torch.tensor([True, False, True, True, False, True])
    logits = logits.masked_fill(~aligned[:, None], -math.inf)  # the join's placeholder rows
    ids, lse = ids.masked_fill(~aligned[:, None], 0), lse.masked_fill(~aligned, 0.0)
    rows = SparseTargets(ids, logits, lse)
    objective = Distillation(alpha=0.7, temperature=2.0)
    objective.cross_tokenizer = True
    mass = torch.full((positions,), 0.5).masked_fill(~aligned, 0.0)
    masked = objective(token_inputs(hidden, head, labels, BatchTargets([rows], vocab, {}, aligned, mass)))
    ce = torch.nn.functional.cross_entropy(head(hidden), labels, reduction="none")
    keep = aligned.nonzero().squeeze(1)
    kept = SparseTargets(ids[keep], logits[keep], lse[keep])
    alone = objective(token_inputs(hidden[keep], head, labels[keep], BatchTargets([kept], vocab)))
    torch.testing.assert_close(masked.loss_sum, alone.loss_sum + ce[~aligned].sum())
    torch.testing.assert_close(masked.sums["kd"], alone.sums["kd"])
    assert int(masked.sums["aligned_share"]) == 4 and float(masked.sums["mapped_mass"]) == 2.0
