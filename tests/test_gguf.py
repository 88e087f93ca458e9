"""A ``.gguf`` file as a model or teacher: weights, config and tokenizer read from the one file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.data.datamodule import DataModule
from distill.teacher.identity import check_teacher_vocabulary, model_identity
from distill.teacher.module import Teacher, TeacherModule
from distill.train.model import load_causal_lm
from distill.train.student import StudentModule
from tests.helpers import TOKENIZER_DIR, write_tiny_gguf


def test_gguf_file_loads_as_student_and_its_tokenizer_through_the_data_module(tmp_path: Path) -> None:
    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    path = str(tmp_path / "tiny.gguf")
    tokenizer = DataModule(train_files=[], tokenizer=path).tokenizer  # what model.tokenizer links to
    assert len(tokenizer) == 258
    assert tokenizer("hello<|endoftext|>").input_ids == [256, 75, 75, 78, 257]  # the merge, the control
    assert "<|endoftext|>" in tokenizer.chat_template
    model = load_causal_lm(path, None, tokenizer, "float32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.equal(model.get_input_embeddings().weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert torch.equal(model.get_output_embeddings().weight, torch.from_numpy(tensors["output.weight"]))
    model.save_pretrained(tmp_path / "export")  # unpacked: an ordinary checkpoint, no GGUF config
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert torch.equal(exported.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_gguf_file_as_teacher(tmp_path: Path) -> None:
    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    path = str(tmp_path / "tiny.gguf")
    module = TeacherModule([Teacher(model=path)], tokenizer=path)  # Teacher checks the source exists
    check_teacher_vocabulary(module.tokenizer, path, None, "teacher tiny")
    teacher = module.teacher_model(0)
    assert torch.equal(teacher.get_input_embeddings().weight, torch.from_numpy(tensors["token_embd.weight"]))
    identity = model_identity(path)  # the cache keys the file's contents, not its name
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "tiny.gguf").write_bytes((tmp_path / "tiny.gguf").read_bytes())
    assert identity == model_identity(str(tmp_path / "copy" / "tiny.gguf"))
    assert set(identity) == {"weights_sha"}


def test_gguf_file_missing_or_without_the_gguf_package(tmp_path: Path, monkeypatch) -> None:
    missing = str(tmp_path / "missing.gguf")
    way_out = "a name ending in .gguf is read as a llama.cpp model file: give the path of an existing one"
    with pytest.raises(ValueError) as refused:  # not "no such directory": it names a file
        Teacher(model=missing, name="t1")
    gone = f"{missing}: no such GGUF file ({missing} does not exist); {way_out}"
    assert str(refused.value) == f"teacher t1: {gone}"
    monkeypatch.chdir(tmp_path)  # a relative name is no hub name either: refused when the teacher is given
    with pytest.raises(ValueError, match=r"^teacher models/t\.gguf: no such GGUF file \(.+ does not"):
        Teacher(model="models/t.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ValueError, match=r"dir\.gguf: no such GGUF file \(.+ is a directory\)"):
        Teacher(model=str(tmp_path / "dir.gguf"))
    students = [("model", {"model": missing}), ("tokenizer", {"model_config": {}, "tokenizer": missing})]
    for option, student in students:
        with pytest.raises(ValueError) as refused:  # the student's too, naming its option
            StudentModule(**student)
        assert str(refused.value) == f"model.{option} {gone}"
    with pytest.raises(ValueError, match=r"missing\.gguf: no such GGUF file"):
        load_causal_lm(missing, None, None)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr("distill.pretrained.find_spec", lambda name: None)
    # a ValueError naming the option, which the CLI prints as one line (an ImportError was a traceback)
    way_in = r"needs the gguf package: pip install 'distill\[gguf\]' \(or pip install gguf\), or give"
    with pytest.raises(ValueError, match=rf"^model\.model .+model\.gguf: reading a GGUF file {way_in}"):
        StudentModule(model=str(tmp_path / "model.gguf"), tokenizer=str(TOKENIZER_DIR))  # before any load
    with pytest.raises(ValueError, match=r"^teacher .+model\.gguf: reading a GGUF file needs the gguf"):
        Teacher(model=str(tmp_path / "model.gguf"))
