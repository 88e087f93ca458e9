"""Teachers with their own chat template: content alignment, clear errors, and collection through
TeacherModule with one row per student trainable position and the end-of-turn remapped."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import distill.teacher.alignment as alignment
from distill.data.batching import Collator
from distill.data.encoding import Encoded, encode_all, encode_record, truncate
from distill.data.formats import to_record
from distill.data.templates import resolve_template
from distill.teacher.alignment import AlignmentError, align, encode_for_teacher, end_of_turn_id, targets
from distill.teacher.collect import plan_jobs
from distill.teacher.module import Teacher, TeacherModule
from distill.teacher.sparse import Sparsity
from tests.helpers import TINY_LLAMA, conversation


@pytest.fixture(scope="module")
def templates(chat_tokenizer):
    return {name: resolve_template(chat_tokenizer, name) for name in ("chatml", "llama3", "mistral")}


def record(i: int, turns: int):
    return to_record(conversation(i, turns=turns), f"data/chat.jsonl:{i + 1}", "auto")


def remapped(ids: list[int], source: int, target: int) -> list[int]:
    return [target if i == source else i for i in ids]


def test_multi_turn_chatml_student_aligns_with_llama3_teacher(chat_tokenizer, templates):
    tok = chat_tokenizer
    chatml, llama3 = templates["chatml"], templates["llama3"]
    s_eot, t_eot = end_of_turn_id(tok, chatml), end_of_turn_id(tok, llama3)
    assert (s_eot, t_eot) == tuple(tok.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"]))
    rec = record(7, turns=3)
    student = encode_record(rec, tok, chatml)
    teacher = encode_record(rec, tok, llama3)
    assert student.input_ids != teacher.input_ids  # the formats differ around the responses

    rows = align(student, teacher, s_eot, t_eot, tok)
    ours, theirs = targets(student), targets(teacher)
    assert rows == list(range(len(ours))) and len(ours) == student.num_trainable
    mapped = [theirs[r] for r in rows]
    assert mapped != ours and mapped.count(t_eot) == 3 and ours.count(s_eot) == 3
    assert remapped(mapped, t_eot, s_eot) == ours  # content ids identical, one end-of-turn per turn

    # through encode_for_teacher, also for students cut on either side: rows follow the kept positions
    for cut in (None, "right", "left"):
        sample = student if cut is None else truncate(student, 40, cut)
        view = encode_for_teacher([sample], tok, llama3, chatml, "inst")[rec.sha]
        assert view.merge_eot and len(view.rows) == sample.num_trainable
        got = remapped([targets(view.teacher)[r] for r in view.rows], t_eot, s_eot)
        assert got == targets(sample)
        # the teacher's input ends right after the last position the student needs (and its label)
        assert len(view.teacher.input_ids) == alignment.target_positions(view.teacher)[view.rows[-1]] + 2
        assert view.rows[0] == (len(theirs) - len(targets(sample)) if cut == "left" else 0)
        assert cut is None or 0 < len(view.rows) < len(theirs)


def test_response_tokenized_differently_names_the_sample(chat_tokenizer, templates, monkeypatch):
    tok = chat_tokenizer
    rec = record(3, turns=2)
    student = encode_record(rec, tok, templates["chatml"])
    real = alignment.encode_record

    def teacher_encoding(r, tokenizer, template, train_on_responses_only=True):
        encoded = real(r, tokenizer, template, train_on_responses_only)
        t = alignment.target_positions(encoded)[20] + 1  # a token inside the second response
        swapped = tok.convert_tokens_to_ids("▁five")
        ids, labels = list(encoded.input_ids), list(encoded.labels)
        ids[t] = labels[t] = swapped
        return Encoded(ids, labels, encoded.sha, encoded.source, r)

    monkeypatch.setattr(alignment, "encode_record", teacher_encoding)
    with pytest.raises(AlignmentError) as error:
        encode_for_teacher([student], tok, templates["llama3"], templates["chatml"], "inst")
    message = str(error.value)
    assert rec.source in message and rec.sha[:12] in message and "'inst'" in message
    assert "first differ at response token 20" in message
    assert "'▁five'" in message  # the teacher's differing token, decoded
    assert "'▁plus'" in message or "'▁is'" in message or "'▁since'" in message


def test_template_adding_a_space_before_the_response_is_an_error(chat_tokenizer, templates):
    """mistral renders "[/INST] It", so the response's first token is '▁It' instead of chatml's 'It'."""
    tok = chat_tokenizer
    rec = record(2, turns=1)
    student = encode_record(rec, tok, templates["chatml"])
    with pytest.raises(AlignmentError, match=re.escape(f"{rec.source} (sample {rec.sha[:12]})")) as error:
        encode_for_teacher([student], tok, templates["mistral"], templates["chatml"], "m")
    assert ">>'It' (id" in str(error.value) and ">>'▁It' (id" in str(error.value)


def test_whole_conversation_training_cannot_be_aligned(chat_tokenizer, templates):
    rec = record(1, turns=1)
    student = encode_record(rec, chat_tokenizer, templates["chatml"], train_on_responses_only=False)
    with pytest.raises(AlignmentError, match="train_on_responses_only"):
        encode_for_teacher([student], chat_tokenizer, templates["llama3"], templates["chatml"])


class StubCache:
    """Stands in for a TeacherCache that lacks every sample."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def plan_sync(self, shas):
        return SimpleNamespace(to_collect={name: list(shas) for name in self.names})


def test_teacher_in_its_own_template_gives_one_row_per_student_position(chat_tokenizer_dir, chat_tokenizer):
    tok = chat_tokenizer
    chatml = resolve_template(tok, "chatml")
    config = {**TINY_LLAMA, "vocab_size": len(tok)}
    teachers = [
        Teacher(model_config=config, name="inst", template="llama3", dtype="float32"),
        Teacher(model_config=config, name="plain", dtype="float32"),  # the student's template
        Teacher(model_config=config, name="same", template="chatml", dtype="float32"),
    ]
    module = TeacherModule(teachers, sparsity=Sparsity(k=8), tokenizer=str(chat_tokenizer_dir))
    assert module.identity(0)["template"] == "llama3" and "template" not in module.identity(1)
    records = [record(i, turns=1 + i % 3) for i in range(4)]
    records.append(to_record({"text": "Plain text reads the same in every template."}, "t.jsonl:1"))
    samples, _ = encode_all(records, tok, chatml, max_length=80)  # the 3-turn one is cut on the right
    assert len(samples) == 5 and any(len(s.input_ids) == 80 for s in samples)

    module.job_teachers = [0]
    batch = Collator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)(samples)
    with pytest.raises(RuntimeError, match="aligned first"):  # never silently in the student's template
        module.predict_step(batch, 0, 0)
    with pytest.raises(ValueError, match="needs the student's"):
        plan_jobs(module, [(StubCache(["inst", "plain", "same"]), samples)])
    jobs = plan_jobs(module, [(StubCache(["inst", "plain", "same"]), samples)], template=chatml)
    assert [j.teacher_index for j in jobs] == [0, 1, 2] and not module.aligned  # planning changes nothing
    module.prepare_jobs([(j.teacher_index, j.samples) for j in jobs], chatml)
    assert set(module.aligned) == {0}  # a teacher in the student's template keeps the plain path

    s_eot, t_eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])
    torch.manual_seed(0)
    model = module.teacher_model(0)
    # a head biased towards both end-of-turn ids puts them in every top-k: the merge case
    plain_head = model.get_output_embeddings()
    head = nn.Linear(plain_head.in_features, plain_head.out_features, bias=True)
    head.weight = plain_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[t_eot], head.bias[s_eot] = 12.0, 11.0
    model.set_output_embeddings(head)

    outputs = module.predict_step(batch, 0, 0)
    assert [o.sha for o in outputs] == [s.sha for s in samples]
    for sample, out in zip(samples, outputs, strict=True):
        assert out.num_tokens == len(sample.input_ids)  # the student's, not the teacher's
        assert out.ids.shape == (sample.num_trainable, 8) and out.lse.shape == (sample.num_trainable,)
        assert torch.equal(out.ids, out.ids.sort(dim=-1).values)
        view = module.aligned[0][sample.sha]
        with torch.no_grad():
            logits = model(torch.tensor([view.teacher.input_ids])).logits[0]
        dense = logits[alignment.target_positions(view.teacher)][view.rows]  # (P, V) aligned rows
        torch.testing.assert_close(out.lse, torch.logsumexp(dense, -1))  # moving mass keeps the total
        if sample.record.text is not None:  # plain text: no template, nothing remapped
            assert not view.merge_eot and (out.ids == t_eot).any(-1).all()
            continue
        merged = dense.clone()
        merged[:, s_eot] = torch.logaddexp(dense[:, s_eot], dense[:, t_eot])
        merged[:, t_eot] = float("-inf")
        expected = merged.topk(8).indices.sort().values
        assert torch.equal(out.ids, expected)
        torch.testing.assert_close(out.logits, merged.gather(-1, expected))
        assert not (out.ids == t_eot).any() and (out.ids == s_eot).any(-1).all()
        # the end-of-turn rows: the student's target is its end-of-turn, the teacher's mass is on it
        eot_rows = [i for i, t in enumerate(targets(sample)) if t == s_eot]
        assert len(eot_rows) == sum(m["role"] == "assistant" for m in sample.record.messages) or (
            len(sample.input_ids) == 80
        )
        top = out.ids.gather(-1, out.logits.argmax(-1, keepdim=True)).squeeze(-1)
        assert (top[eot_rows] == s_eot).all()
    module.release()


def test_model_template_reads_the_teachers_own_tokenizer(chat_tokenizer_dir, tmp_path, templates):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    own.chat_template = templates["llama3"].source
    own.save_pretrained(tmp_path / "instruct")
    module = TeacherModule(
        [Teacher(model=str(tmp_path / "instruct"), name="inst", template="model")],
        tokenizer=str(chat_tokenizer_dir),
    )
    resolved = module.teacher_template(0)
    assert resolved.source == templates["llama3"].source and resolved.end_of_turn == "<|eot_id|>"
