"""``python -m distill generate``: completions as SFT data, resumable, settings kept, adapters."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from distill.commands import main
from distill.data.datamodule import DataModule
from distill.rollout.generate import generate
from tests.helpers import save_remote_code_adapter, save_tiny_teacher, write_jsonl, write_tiny_gguf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("model"))


def prompt_file(tmp_path, n: int = 5):
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i), "id": i} for i in range(n)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(model_dir, prompts, output, **options):
    settings = {"template": "mistral", "num_samples": 2, "max_new_tokens": 5, "batch_size": 2, **options}
    return generate(str(model_dir), str(prompts), str(output), **settings)


def test_completions_are_sft_records_of_every_prompt(tmp_path, model_dir, tokenizer):
    out = run(model_dir, prompt_file(tmp_path), tmp_path / "out" / "completions.jsonl")
    rows = lines(out)
    assert len(rows) == 10
    assert [(r["id"], r["sample"]) for r in rows] == [(i, s) for i in range(5) for s in (0, 1)]
    first = rows[0]
    assert first["messages"][:-1] == [{"role": "user", "content": "What is 0 plus 0?"}]
    assert first["messages"][-1]["role"] == "assistant" and first["answer"] == "0"
    assert first["source"].endswith("prompts.jsonl:1") and isinstance(first["stopped"], bool)
    meta = json.loads((tmp_path / "out" / "completions.jsonl.meta.json").read_text())
    assert (
        meta["sampling"]["max_new_tokens"] == 5 and meta["num_samples"] == 2 and meta["template"] == "mistral"
    )
    # the file trains as SFT data as it is: one sample per completion, the answers are what is trained
    data = DataModule(train_files=str(out), tokenizer=str(model_dir), template="mistral")
    data.setup("fit")
    assert len(data.train) == 10 and all(sample.num_trainable for sample in data.train)


def test_a_rerun_skips_done_prompts_and_drops_a_line_cut_short(tmp_path, model_dir):
    prompts, out = prompt_file(tmp_path), tmp_path / "completions.jsonl"
    whole = lines(run(model_dir, prompts, out))
    # killed mid-run: two prompts done, the third's first line written, its second cut mid-line
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:5]) + text[5][:20])
    run(model_dir, prompts, out)
    rows = lines(out)
    assert rows[:5] == whole[:5]  # nothing written before is lost or rewritten
    # issue 25 #7: prompt 2 had one of two: its batch is generated again, and only its missing sample written
    keys = [(row["id"], row["sample"]) for row in rows]
    assert sorted(keys) == [(i, s) for i in range(5) for s in (0, 1)]
    assert len(lines(run(model_dir, prompts, out))) == 10  # all done: nothing more


def test_other_settings_or_a_foreign_file_are_refused(tmp_path, model_dir):
    prompts, out = prompt_file(tmp_path), tmp_path / "completions.jsonl"
    run(model_dir, prompts, out)
    with pytest.raises(ValueError, match=r"other settings \(sampling differ"):
        run(model_dir, prompts, out, temperature=0.5)
    foreign = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"sft\.jsonl:1: not a completion line"):
        run(model_dir, prompts, foreign)


def test_the_same_model_by_another_path_resumes(tmp_path, model_dir, monkeypatch):
    """Issue 25 #7: the sidecar recorded the path string, so ./model and model were refused as two."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_dir, "model")
    prompts, out = prompt_file(tmp_path, 2), tmp_path / "completions.jsonl"
    run("model", prompts, out)
    assert len(lines(run("./model", prompts, out))) == 4  # the same weights: resumed, nothing more


def test_other_weights_saved_at_the_same_path_are_refused(tmp_path, model_dir):
    """Issue 25 #7: weights changed in place resumed silently, mixing two models in one file."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = shutil.copytree(model_dir, tmp_path / "model")
    prompts, out = prompt_file(tmp_path, 2), tmp_path / "completions.jsonl"
    run(model, prompts, out)
    changed = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        changed.lm_head.weight.mul_(2)
    changed.save_pretrained(model)
    with pytest.raises(ValueError, match=r"other settings \(model differ"):
        run(model, prompts, out)


@pytest.mark.parametrize(
    ("where", "adapter", "error"),
    [
        ("empty", False, r"--model empty: the directory holds no model \(no config\.json\)"),
        ("out/sft", False, r"--model out/sft: no such directory \(.*out/sft does not exist\)"),
        ("/nowhere/sft", False, r"--model /nowhere/sft: no such directory \(/nowhere/sft does not exist\)"),
        ("empty", True, r"--adapter empty: the directory holds no adapter \(no adapter_config\.json\)"),
    ],
    ids=["model-dir-without-model", "missing-relative-path", "missing-absolute-path", "adapter-without-one"],
)
def test_a_model_that_is_not_there_is_named(tmp_path, model_dir, monkeypatch, where, adapter, error):
    """Issue 25 #7: a directory without a model said "install sentencepiece or tiktoken", a missing path
    "Repo id must be in the form" or "check your internet connection" (``out/sft`` is a valid hub id,
    but ``out`` is a local directory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    model, options = (model_dir, {"adapter": where}) if adapter else (where, {})
    with pytest.raises(ValueError, match=error):
        run(model, prompt_file(tmp_path, 2), tmp_path / "completions.jsonl", **options)
    assert not (tmp_path / "completions.jsonl.meta.json").exists()


def test_a_failed_load_records_no_settings(tmp_path, model_dir):
    """Issue 25 #7: the .meta.json was written before the model loaded, and stayed when the load failed."""
    import shutil

    no_weights = shutil.copytree(model_dir, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"model\.safetensors"):
        run(no_weights, prompt_file(tmp_path, 2), tmp_path / "completions.jsonl")
    assert not (tmp_path / "completions.jsonl.meta.json").exists()


def test_a_tokenizer_without_a_chat_template_names_the_template_option(tmp_path, model_dir):
    """Issue 25 #7: the hint named data.template, a fit's option; generate's is --template."""
    with pytest.raises(ValueError, match=r"no chat_template; pass --template with one of \['alpaca'"):
        run(model_dir, prompt_file(tmp_path, 2), tmp_path / "completions.jsonl", template=None)


def test_an_adapter_runs_its_base_models_code_only_when_the_user_asks(tmp_path, capsys):
    """Issue 25 #1: the adapter's saved distill_config.yaml asked for trust_remote_code, and generating
    with it ran the base's modeling_*.py."""
    adapter, marker = save_remote_code_adapter(tmp_path)
    prompts = prompt_file(tmp_path, 1)
    run(tmp_path / "base", prompts, tmp_path / "a.jsonl", adapter=str(adapter))
    assert not marker.exists()
    assert "asks for trust_remote_code: true; not applied" in capsys.readouterr().err
    run(tmp_path / "base", prompts, tmp_path / "b.jsonl", adapter=str(adapter), trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_the_command_reads_a_config_and_overrides(tmp_path, model_dir):
    out = tmp_path / "completions.jsonl"
    config = {"model": str(model_dir), "prompts": str(prompt_file(tmp_path, 3)), "output": str(out)}
    config.update(template="mistral", max_new_tokens=3, num_samples=1)
    (tmp_path / "generate.yaml").write_text(yaml.safe_dump(config))
    main(["generate", "--config", str(tmp_path / "generate.yaml"), "--num_samples", "2"])
    assert len(lines(out)) == 6
    assert json.loads((tmp_path / "completions.jsonl.meta.json").read_text())["num_samples"] == 2


def test_an_adapter_generates_what_its_merged_model_generates(tmp_path, model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # an adapter that changes the outputs
    peft.save_pretrained(tmp_path / "adapter")
    peft.merge_and_unload().save_pretrained(tmp_path / "merged")
    prompts = prompt_file(tmp_path, 3)
    with_adapter = lines(run(model_dir, prompts, tmp_path / "a.jsonl", adapter=str(tmp_path / "adapter")))
    merged = lines(run(tmp_path / "merged", prompts, tmp_path / "m.jsonl", tokenizer=str(model_dir)))
    plain = lines(run(model_dir, prompts, tmp_path / "p.jsonl"))
    answers = [[r["messages"][-1]["content"] for r in rows] for rows in (with_adapter, merged, plain)]
    assert answers[0] == answers[1] and answers[0] != answers[2]


def test_a_completion_holding_a_line_separator_character_reads_back_as_one_line(tmp_path):
    from distill.rollout.generate import completed_prompts, read_completions

    # json.dumps(ensure_ascii=False) keeps U+2028 as it is: str.splitlines() would cut the line there
    lines = [{"prompt_sha": "a", "sample": 0, "messages": [{"role": "assistant", "content": "x\u2028y"}]}]
    lines.append({"prompt_sha": "a", "sample": 0, "messages": []})  # a batch generated again after a crash
    path = tmp_path / "out.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    assert completed_prompts(path, num_samples=1) == {"a"}
    ((line, number),) = read_completions(path).values()
    assert number == 1 and line["messages"][0]["content"] == "x\u2028y"  # the first line wins


def test_dtype_applies_to_a_model_and_to_an_adapter_on_it(tmp_path, model_dir, tokenizer):
    """``--dtype`` was ignored with ``--adapter`` (the base loaded in its saved float32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distill.rollout.generate import load_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "a")
    for adapter in (None, str(tmp_path / "a")):
        policy = load_model(str(model_dir), adapter, "bfloat16", tokenizer)
        assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}, adapter
        assert any("lora_A" in name for name, _ in policy.named_parameters()) == (adapter is not None)
    adapted = load_model(str(model_dir), str(tmp_path / "a"), "auto", tokenizer)
    assert {p.dtype for p in adapted.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match=r"--dtype is auto or a float type .* got 'int8'"):
        run(model_dir, prompt_file(tmp_path), tmp_path / "out.jsonl", dtype="int8")


def test_a_gguf_file_generates_through_the_loader_a_fit_uses(tmp_path):
    """Issue 29: ``--model x.gguf`` was refused as a directory without config.json, and load_model read
    only directories and hub names."""
    from distill.rollout.generate import load_model
    from distill.teacher.identity import model_identity

    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    path = str(tmp_path / "tiny.gguf")
    rows = lines(run(path, prompt_file(tmp_path, 2), tmp_path / "out.jsonl", template=None))  # the file's
    assert [(row["id"], row["sample"]) for row in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["model"] == model_identity(path) and meta["template"] == "tokenizer"
    policy = load_model(path, None, "float32", DataModule(train_files=[], tokenizer=path).tokenizer)
    assert torch.equal(policy.get_input_embeddings().weight, torch.from_numpy(tensors["token_embd.weight"]))
