"""On-policy distillation: the objective against naive full-vocabulary references, the PG form's gradient
by enumeration, lmbda = 0 as online KD on the dataset's responses, teachers with their own template,
where completions come from, refusals, and a fit that resumes with the same samples."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import yaml
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distill.data.batch import PromptBatch, TokenBatch
from distill.data.batching import Collator, pad_token_id
from distill.data.encoding import IGNORE_INDEX, encode_all
from distill.data.facts import DataFacts
from distill.data.formats import DataFormatError, read_records
from distill.data.prompt_datamodule import PromptDataModule
from distill.data.templates import resolve_template
from distill.losses.kd import reverse_kl_policy_gradient
from distill.objectives import Distillation, OnPolicyDistillation
from distill.objectives.context import Origin, Step
from distill.teacher.module import Teacher
from tests.helpers import (
    ROOT,
    TINY_LLAMA,
    TOKENIZER_DIR,
    check_killed_fit_resumes,
    conversation,
    logged_values,
    objective_context,
    objective_loss,
    save_tiny_teacher,
    with_last_checkpoint,
    write_jsonl,
)

EOS = 2
VOCAB = 32000


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=VOCAB)
    return AutoModelForCausalLM.from_config(config).train()


@pytest.fixture(scope="module")
def second_teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("second_teacher"), hidden_size=48)


class FixedEngine:
    """Returns preset completions (the same each call) and records which model it was asked to run."""

    def __init__(self, completions: torch.Tensor) -> None:
        self.completions = completions
        self.models: list = []

    def __call__(self, model, prompt_ids, prompt_mask, *, num_samples, **kwargs) -> torch.Tensor:
        self.models.append(model)
        return self.completions


def prompts_of(ids: torch.Tensor, mask: torch.Tensor, messages: list, shas: list[str]) -> PromptBatch:
    return PromptBatch(
        prompt_ids=ids, prompt_mask=mask, prompts=[""] * len(shas), messages=messages, fields={},
        sources=[""] * len(shas), shas=shas,
    )  # fmt: skip


def prompt_batch(num_prompts: int = 2) -> PromptBatch:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(100, VOCAB, (num_prompts, 6), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    messages = [[{"role": "user", "content": f"question {i}"}] for i in range(num_prompts)]
    return prompts_of(ids, mask, messages, [f"sha{i}" for i in range(num_prompts)])


def completions(rows: int = 2, length: int = 7) -> torch.Tensor:
    ids = torch.randint(100, VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))
    ids[0, 4] = EOS  # the first one stops; what follows its stop is padding
    return ids


PROMPTS = DataFacts("a test", "prompts", pad_id=0, stop_ids=(EOS,))
EVALUATING = Step(training=False)  # validation draws from the student


def set_up(objective, policy, data: DataFacts = PROMPTS, tokenizer_dir=TOKENIZER_DIR):
    """``objective`` set up on prompt batches, ``policy`` the student."""
    origin = Origin(tokenizer=str(tokenizer_dir))
    objective.setup(objective_context(None, policy, data, origin=origin))
    return objective


def objective_for(teacher_dirs, engine, policy, data=PROMPTS, **kwargs) -> OnPolicyDistillation:
    teachers = [Teacher(model=str(d), name=f"t{i}", dtype="float32") for i, d in enumerate(teacher_dirs)]
    return set_up(OnPolicyDistillation(teachers, engine=engine, **kwargs), policy, data)


def full_log_probs(model, batch: TokenBatch) -> torch.Tensor:
    """(N, V) log-softmax of full logits at every trained position, row after row."""
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits.float()
    trained = batch.labels[:, 1:] != IGNORE_INDEX
    return torch.log_softmax(logits[:, :-1][trained], dim=-1)


def naive_divergence(log_p: torch.Tensor, log_q: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """(N,) the divergence written out on full distributions (GKD's JSD convention)."""
    p, q = log_p.exp(), log_q.exp()
    if loss == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if loss == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)


def gradients(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return grads


@pytest.mark.parametrize(("loss", "beta"), [("jsd", 0.3), ("forward_kl", 0.5), ("reverse_kl", 0.5)])
def test_the_onpolicy_loss_and_gradient_equal_a_full_vocabulary_reference(student, teacher_dir, loss, beta):
    engine = FixedEngine(completions())
    # the whole vocabulary as the teacher's head: the bucket divergence is then the dense one
    objective = objective_for([teacher_dir], engine, student, loss=loss, beta=beta, online_k=VOCAB)
    batch = objective.prepare(prompt_batch(), EVALUATING)
    assert engine.models == [student]  # the student sampled
    labels = batch.labels[:, 1:]
    assert (labels != IGNORE_INDEX).sum(dim=1).tolist() == [5, 7]  # up to and including the stop token
    out = objective_loss(objective, student, batch)
    (out.loss_sum / out.num_units).backward()
    got = gradients(student)

    (teacher,) = objective.teachers.models(torch.device("cpu"))
    with torch.no_grad():
        log_p = full_log_probs(teacher, batch)
    log_q = full_log_probs(student, batch)
    want = naive_divergence(log_p, log_q, loss, beta).sum()
    (want / log_q.shape[0]).backward()
    assert out.num_units == 12
    assert_close(out.loss_sum, want.detach(), rtol=1e-4, atol=1e-5)
    for g, w in zip(got, gradients(student), strict=True):
        assert_close(g, w, rtol=1e-3, atol=1e-6)
    picked = log_p.gather(1, labels[labels != IGNORE_INDEX][:, None])
    assert float(out.sums["teacher_ce"]) == pytest.approx(float(-picked.sum()), rel=1e-5)
    assert float(out.sums["on_policy"]) == 12.0


def test_the_policy_gradient_form_equals_a_naive_reference_with_teachers_mixed_by_weight(
    student, teacher_dir, second_teacher_dir
):
    engine = FixedEngine(completions())
    weights = [0.75, 0.25]
    objective = objective_for(
        [teacher_dir, second_teacher_dir], engine, student, loss="reverse_kl_pg", teacher_weights=weights
    )
    assert objective.metric_names == ("ce", "kd", "teacher_ce/t0", "teacher_ce/t1", "on_policy")
    batch = objective.prepare(prompt_batch(), EVALUATING)
    out = objective_loss(objective, student, batch)
    out.loss_sum.backward()
    got = gradients(student)

    labels = batch.labels[:, 1:][batch.labels[:, 1:] != IGNORE_INDEX][:, None]
    with torch.no_grad():
        per_teacher = [full_log_probs(t, batch).gather(1, labels) for t in objective.teachers.models("cpu")]
    mixture = torch.log(sum(w * lp.exp() for w, lp in zip(weights, per_teacher, strict=True)))
    log_q = full_log_probs(student, batch).gather(1, labels)
    advantage = (mixture - log_q).detach()
    want = (-advantage * log_q).sum()
    want.backward()
    assert_close(out.loss_sum, want.detach(), rtol=1e-4, atol=1e-5)
    assert_close(out.sums["kd"], -advantage.sum(), rtol=1e-4, atol=1e-5)
    for g, w in zip(got, gradients(student), strict=True):
        assert_close(g, w, rtol=1e-3, atol=1e-6)


def test_the_policy_gradient_is_the_reverse_kl_gradient_in_expectation():
    """Enumerating every token of a tiny vocabulary, weighted by the student's probability of it."""
    torch.manual_seed(3)
    vocab, positions = 6, 4
    student_logits = torch.randn(positions, vocab, dtype=torch.float64, requires_grad=True)
    teacher_log_p = torch.log_softmax(torch.randn(positions, vocab, dtype=torch.float64), -1)
    log_q = torch.log_softmax(student_logits, -1)
    (exact,) = torch.autograd.grad((log_q.exp() * (log_q - teacher_log_p)).sum(), student_logits)
    expected = torch.zeros_like(exact)
    for token in range(vocab):
        log_q = torch.log_softmax(student_logits, -1)
        sampled = torch.full((positions, 1), token)
        loss, _ = reverse_kl_policy_gradient(log_q.gather(1, sampled), teacher_log_p.gather(1, sampled))
        weight = log_q.gather(1, sampled).exp().detach()  # q(token) at each position
        (weight * loss).sum().backward()
        expected += student_logits.grad
        student_logits.grad = None
    assert_close(expected, exact, rtol=1e-10, atol=1e-12)
    # and a single sample's loss is not the KL's gradient: the expectation is what matches
    log_q = torch.log_softmax(student_logits, -1)
    one, _ = reverse_kl_policy_gradient(log_q[:, :1], teacher_log_p[:, :1])
    (single,) = torch.autograd.grad(one.sum(), student_logits)
    assert not torch.allclose(single, exact)


def single_turn_file(tmp_path):
    rows = [conversation(i) for i in range(5)]
    rows[3]["messages"][2]["content"] = "A longer answer, so that rows differ: " + "words " * 6
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def test_lmbda_zero_is_online_kd_on_the_datasets_responses(tmp_path, student, teacher_dir, tokenizer):
    file = single_turn_file(tmp_path)
    data = PromptDataModule(file, tokenizer=str(TOKENIZER_DIR), template="mistral", responses=True)
    data.setup("fit")
    prompts = data.collator(data.train)
    template = resolve_template(tokenizer, "mistral")
    samples, _ = encode_all(read_records(file), tokenizer, template, max_length=512)
    sft = Collator(pad_token_id(tokenizer))(samples)

    teacher = Teacher(model=str(teacher_dir), name="t0", dtype="float32")
    online = Distillation(loss="jsd", beta=0.3, online=[teacher], online_k=16)
    set_up(online, student, DataFacts("a test", "samples", 0))
    want = objective_loss(online, student, online.prepare(sft, Step()))

    engine = FixedEngine(None)
    objective = OnPolicyDistillation([teacher], loss="jsd", beta=0.3, lmbda=0.0, online_k=16, engine=engine)
    set_up(objective, student, data.facts())
    got = objective_loss(objective, student, objective.prepare(prompts, Step(training=True)))
    assert engine.models == []  # nothing sampled
    assert got.num_units == want.num_units == sum(s.num_trainable for s in samples)
    assert_close(got.loss_sum, want.loss_sum, rtol=1e-4, atol=1e-5)
    assert_close(got.sums["teacher_ce"], want.sums["teacher_ce"], rtol=1e-4, atol=1e-5)
    assert float(got.sums["on_policy"]) == 0.0


def test_a_response_is_what_sft_trains_on_in_the_last_turn(tmp_path, tokenizer):
    file = write_jsonl(tmp_path / "chat.jsonl", [conversation(1, turns=3)])
    data = PromptDataModule(file, tokenizer=str(TOKENIZER_DIR), template="mistral", responses=True)
    data.setup("fit")
    (prompt,) = data.train
    (sample,), _ = encode_all(read_records(file), tokenizer, resolve_template(tokenizer, "mistral"), 512)
    # the sample's last trained stretch, its end-of-turn included
    trained = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
    start = max(i for i in trained if i - 1 not in trained)
    assert prompt.response_ids == sample.input_ids[start : trained[-1] + 1]
    assert prompt.input_ids == sample.input_ids[:start]
    assert tokenizer.decode(prompt.response_ids).endswith("It is 3, since 1 plus 2 is 3.</s>")
    roles = ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["role"] for m in prompt.messages] == roles


def test_a_teacher_with_its_own_template_reads_the_prompt_in_it(tmp_path, chat_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(tok))
    teacher_dir = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_config(config)
    im_end, eot_id = tok.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])
    student_template = resolve_template(tok, "chatml")
    messages = [[{"role": "user", "content": "What is 2 plus 2?"}], [{"role": "user", "content": "Hi"}]]
    texts = [student_template.render(tok, m, generation_prompt=True) for m in messages]
    prompt_ids = tok(texts, add_special_tokens=False)["input_ids"]
    width = max(map(len, prompt_ids))
    batch = prompts_of(
        torch.tensor([[0] * (width - len(p)) + p for p in prompt_ids]),
        torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids]),
        messages,
        ["a", "b"],
    )
    sampled = completions()
    sampled[0, 4] = im_end  # the first stops on the student's end-of-turn
    teacher = Teacher(model=str(teacher_dir), name="llama", dtype="float32", template="llama3")
    objective = OnPolicyDistillation([teacher], online_k=8, engine=FixedEngine(sampled))
    facts = DataFacts("a test", "prompts", pad_token_id(tok), student_template, stop_ids=(im_end, EOS))
    set_up(objective, student, facts, chat_tokenizer_dir)
    batch = objective.prepare(batch, EVALUATING)

    (model,) = objective.teachers.models(torch.device("cpu"))
    llama3 = resolve_template(tok, "llama3")
    want_nll, want_top = 0.0, []
    for row, turns in enumerate(messages):
        kept = sampled[row, :5] if row == 0 else sampled[row]
        theirs = torch.where(kept == im_end, eot_id, kept)  # the teacher ends its turn with its own token
        text = llama3.render(tok, turns, generation_prompt=True)
        context = tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + theirs.tolist()])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(context) - 1 : -1].float()
        logits[:, im_end] = torch.logaddexp(logits[:, im_end], logits[:, eot_id])  # its end-of-turn mass ...
        logits[:, eot_id] = -math.inf  # ... on the student's id
        log_p = torch.log_softmax(logits, -1)
        want_nll -= float(log_p.gather(1, kept[:, None]).sum())
        want_top += log_p.argmax(-1).tolist()
    (targets,) = batch.targets.per_teacher
    assert float(batch.targets.nll["llama"]) == pytest.approx(want_nll, rel=1e-4)
    top = targets.ids.gather(1, targets.logits.argmax(-1, keepdim=True)).squeeze(1)
    assert top.tolist() == want_top
    assert not torch.isfinite(targets.logits[targets.ids == eot_id]).any()  # no mass left on its own id


def test_seq_kd_samples_from_the_teacher_and_lmbda_mixes_by_step(student, teacher_dir):
    engine = FixedEngine(completions())
    with_responses = replace(PROMPTS, responses=True)  # lmbda 0: validation scores the dataset's responses
    objective = objective_for(
        [teacher_dir], engine, student, with_responses, lmbda=0.0, seq_kd=True, online_k=4
    )
    batch = objective.prepare(prompt_batch(), Step(training=True))
    assert engine.models == objective.teachers.models("cpu")  # the teacher sampled, not the student
    assert batch.on_policy is False
    # lmbda: the share of training micro-batches the student samples, drawn per (epoch, batch) position
    objective = objective_for([teacher_dir], FixedEngine(completions()), student, lmbda=0.3, seq_kd=True)
    sources = [objective.completion_source(Step(True, 0, position)) for position in range(400)]
    assert 0.24 < sources.count("student") / 400 < 0.36
    assert set(sources) == {"student", "teacher"}
    again = [objective.completion_source(Step(True, 0, position)) for position in range(400)]
    assert again == sources  # the same draws after a resume


def test_onpolicy_distillation_refuses_what_cannot_work(tmp_path, teacher_dir):
    teacher = Teacher(model=str(teacher_dir), name="t")
    with pytest.raises(ValueError, match=r"lmbda: 1\.0 and no seq_kd"):
        OnPolicyDistillation([teacher], loss="reverse_kl_pg", lmbda=0.5)
    with pytest.raises(ValueError, match="unknown OnPolicyDistillation loss 'sampled_ce'"):
        OnPolicyDistillation([teacher], loss="sampled_ce")
    with pytest.raises(ValueError, match=r"lmbda .* must be in \[0, 1\]"):
        OnPolicyDistillation([teacher], lmbda=1.5)
    own = Teacher(model=str(teacher_dir), name="t", template="llama3")
    with pytest.raises(ValueError, match="seq_kd samples from the first teacher"):
        OnPolicyDistillation([own], seq_kd=True)
    # batches on the dataset's responses need them
    with pytest.raises(ValueError, match=r"set data\.responses: true"):
        set_up(OnPolicyDistillation([teacher], lmbda=0.5), None)
    # a prompt file read with responses needs each conversation to end with one
    unanswered = {"messages": [{"role": "user", "content": "hi"}]}
    file = write_jsonl(tmp_path / "p.jsonl", [conversation(0), unanswered])
    data = PromptDataModule(file, tokenizer=str(TOKENIZER_DIR), template="mistral", responses=True)
    with pytest.raises(DataFormatError, match=r"p\.jsonl:2: .*"):
        data.setup("fit")
    text = write_jsonl(tmp_path / "t.jsonl", [conversation(0), {"text": "plain"}])
    data = PromptDataModule(text, tokenizer=str(TOKENIZER_DIR), template="mistral", responses=True)
    with pytest.raises(DataFormatError, match=r"t\.jsonl:2: .* this record is plain text"):
        data.setup("fit")


def onpolicy_config(tmp_path, name: str, teacher_dir, chat_file) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "kd_onpolicy.yaml").read_text())
    run_dir = tmp_path / name
    config["trainer"].update(
        max_steps=10, log_every_n_steps=1, val_check_interval=5, enable_progress_bar=False,
        default_root_dir=str(run_dir),
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}},
        callbacks=[],
    )  # fmt: skip
    model = config["model"]["init_args"]
    model["model_config"] = TINY_LLAMA
    init = model["objective"]["init_args"]
    teachers = [{"model": str(teacher_dir), "name": "t", "dtype": "float32"}]
    init.update(teachers=teachers, online_k=8)
    init["sampling"]["max_new_tokens"] = 6
    config["data"]["init_args"].update(
        train_files=str(chat_file), val_files=None, val_fraction=0.25, template="mistral", batch_size=2,
        max_eval_samples=4, max_response_length=64,
    )  # fmt: skip
    return config


def test_a_killed_onpolicy_fit_resumes_with_the_same_samples(tmp_path, teacher_dir, chat_file):
    def config_in(name: str):
        (tmp_path / name).mkdir(exist_ok=True)
        return with_last_checkpoint(onpolicy_config(tmp_path, name, teacher_dir, chat_file), tmp_path / name)

    check_killed_fit_resumes(tmp_path, config_in, ["--trainer.max_steps", "10"])
    share = logged_values(tmp_path / "reference", "train/on_policy")
    assert set(share) == {0.0, 1.0} and 0 < sum(share) < len(share)  # lmbda 0.5: both kinds of batch
    assert logged_values(tmp_path / "reference", "val/teacher_ce")  # graded on the student's own samples
