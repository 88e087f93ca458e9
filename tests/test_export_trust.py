"""The export is the model that was trained: no export of an untrained or interrupted fit, never a
half-written one over a good one, the chat template training used, and LoRA with added tokens merged
into exactly the trained model."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from distill.callbacks import HFExport
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from distill.cli import run_cli
from distill.commands import main
from distill.data.encoding import NoTrainableTokensError
from tests.helpers import (
    TOKENIZER_DIR,
    clean_env,
    kd_config,
    run,
    save_tiny_teacher,
    write_config,
)


def previous_export(directory: Path) -> dict[str, bytes]:
    """A stand-in for an earlier run's export; returns its bytes by relative path."""
    (directory / "sub").mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"weights of an earlier, trained run")
    (directory / "sub" / "config.json").write_text('{"earlier": true}')
    return snapshot(directory)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


# ---- item 4: no trainable data is an error, and no untrained or partial export replaces a good one ----


def test_empty_training_file_fails_naming_it_and_keeps_the_previous_export(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    before = previous_export(tmp_path / "hf")
    result = run(["fit", "--config", str(write_config(tmp_path, empty))], clean_env(), check=False)
    assert result.returncode != 0
    assert "nothing to train on" in result.stderr and str(empty) in result.stderr
    assert "No training batches" not in result.stderr + result.stdout
    assert snapshot(tmp_path / "hf") == before


def test_every_sample_dropped_is_an_error_naming_the_file(tmp_path, chat_file):
    config = write_config(tmp_path, chat_file, truncation="drop", max_seq_length=8)
    with pytest.raises(NoTrainableTokensError, match="all 19 training records were dropped") as error:
        main(["fit", "--config", str(config)])
    message = str(error.value)
    assert str(chat_file) in message and "longer than max_seq_length=8" in message


def test_kd_with_an_empty_training_file_fails_before_any_teacher_work(tmp_path, kd_teacher_dir):
    config = kd_config(tmp_path, kd_teacher_dir)
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(NoTrainableTokensError, match=str(tmp_path / "train.jsonl")):
        main(["fit", "--config", str(config)])
    assert not (tmp_path / "cache").exists()  # nothing synced or collected


def test_a_fit_without_an_optimizer_step_exports_nothing(tmp_path, chat_file):
    before = previous_export(tmp_path / "hf")
    main(["fit", "--config", str(write_config(tmp_path, chat_file)), "--trainer.max_steps", "0"])
    assert snapshot(tmp_path / "hf") == before


class SigtermAt(L.Callback):
    """Sends this process a SIGTERM when a training batch starts at ``step`` (a scheduler's pre-emption)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_fit_stopped_by_sigterm_exports_nothing(tmp_path, chat_file):
    before = previous_export(tmp_path / "hf")
    config = write_config(tmp_path, chat_file)
    cli = run_cli(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False)
    cli.trainer.callbacks.append(SigtermAt(2))
    # the pre-emption checkpoint is saved, then the fit stops with SystemExit(143)
    with contextlib.suppress(SystemExit):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.interrupted and 0 < cli.trainer.global_step < 50
    (export,) = [c for c in cli.trainer.callbacks if isinstance(c, HFExport)]
    export.on_fit_end(cli.trainer, cli.model)  # as if the fit had returned after the signal
    assert snapshot(tmp_path / "hf") == before


def test_a_crash_mid_export_leaves_the_previous_export_whole(tmp_path, chat_file, monkeypatch):
    before = previous_export(tmp_path / "hf")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    # the weights are written by then: a crash after them must not leave them over the old export
    monkeypatch.setattr(GenerationConfig, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["fit", "--config", str(write_config(tmp_path, chat_file)), "--trainer.max_steps", "1"])
    assert snapshot(tmp_path / "hf") == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")]  # no staging left
    monkeypatch.undo()
    main(["fit", "--config", str(write_config(tmp_path, chat_file)), "--trainer.max_steps", "1"])
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert not (tmp_path / "hf" / "sub").exists()  # replaced whole, no file of the old export mixed in


# ---- item 10: the export carries the chat template training rendered with ----------------------------


def test_export_carries_the_template_training_used_not_the_tokenizers_own(tmp_path, chat_file):
    tokenizer_dir = tmp_path / "tokenizer"
    own = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    own.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    own.save_pretrained(tokenizer_dir)
    config = write_config(tmp_path, chat_file, template="mistral")
    override = {"model": {"init_args": {"tokenizer": str(tokenizer_dir)}}}
    (tmp_path / "tokenizer.yaml").write_text(yaml.safe_dump(override))
    args = ["--config", str(config), "--config", str(tmp_path / "tokenizer.yaml")]
    main(["fit", *args, "--trainer.max_steps", "1"])

    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    data = dataset_samples_with(args)
    data.attach_records()
    sample = next(s for s in data.train if len(s.record.messages) > 3)
    messages = list(sample.record.messages)
    trained_text = data.chat_template.render(data.tokenizer, messages, generation_prompt=False)
    assert exported.apply_chat_template(messages, tokenize=False) == trained_text
    assert trained_text != own.apply_chat_template(messages, tokenize=False)
    ids = exported.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(ids) == sample.input_ids


def dataset_samples_with(args: list[str]):
    cli = run_cli(args, run=False)
    cli.datamodule.setup("fit")
    return cli.datamodule


# ---- item 11: LoRA on a base whose tokenizer gained tokens -------------------------------------------


def test_lora_with_added_tokens_trains_and_merges_the_new_rows(tmp_path, chat_file, chat_tokenizer_dir):
    base = save_tiny_teacher(tmp_path / "base")  # vocabulary 32000; the chat tokenizer has 32005
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    assert AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().num_embeddings < len(tokenizer)
    config = write_config(tmp_path, chat_file, template="chatml", add_eot_to_stop_tokens=True)
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    override = {
        "model": {"init_args": {"model": str(base), "tokenizer": str(chat_tokenizer_dir), "lora": lora}}
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(override))
    cli = run_cli(
        ["fit", "--config", str(config), "--config", str(tmp_path / "lora.yaml"), "--trainer.max_steps", "6"]
    )

    new_ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert min(new_ids) >= 32000
    embeddings = cli.model.causal_lm.get_input_embeddings()  # peft's trained copy beside the original
    trained, initial = embeddings.modules_to_save["default"].weight, embeddings.original_module.weight
    assert trained.shape[0] == len(tokenizer)
    assert not torch.allclose(trained[new_ids], initial[new_ids], atol=1e-4)

    main(["merge", "--adapter", str(tmp_path / "hf"), "--output", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    text = "<|im_start|>user\nWhat is 3 plus 0?<|im_end|>\n<|im_start|>assistant\nIt is 3.<|im_end|>"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert set(new_ids) <= set(ids[0].tolist())
    with torch.no_grad():
        want = cli.model.model.eval()(ids).logits
        got = merged(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert merged.get_input_embeddings().num_embeddings == len(tokenizer)
    loss = torch.nn.functional.cross_entropy
    assert abs(loss(got[0, :-1], ids[0, 1:]) - loss(want[0, :-1], ids[0, 1:])) < 1e-4
