"""A ``.gguf`` file as a model or teacher: weights, config and tokenizer read from the one file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.data.datamodule import DataModule
from distill.teacher.identity import check_teacher_vocabulary, model_identity
from distill.teacher.module import Teacher, TeacherModule
from distill.train.model import load_causal_lm
from distill.train.student import StudentModule

HIDDEN, FFN = 16, 32


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A one-layer fp32 llama with a byte-level BPE tokenizer (the 256 byte symbols, one merge and an
    end-of-text control token) and a chat template; returns the tensors written."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "he", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["h e"])
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # 3: a control token
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}")
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    shapes["output.weight"] = (len(tokens), HIDDEN)
    for name, shape in [
        ("attn_norm", (HIDDEN,)), ("ffn_norm", (HIDDEN,)), ("attn_q", (HIDDEN, HIDDEN)),
        ("attn_k", (HIDDEN, HIDDEN)), ("attn_v", (HIDDEN, HIDDEN)), ("attn_output", (HIDDEN, HIDDEN)),
        ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN)),
    ]:  # fmt: skip
        shapes[f"blk.0.{name}.weight"] = shape
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


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
    for student in ({"model": missing}, {"model_config": {}, "tokenizer": missing}):  # the student's too
        with pytest.raises(ValueError) as refused:
            StudentModule(**student)
        assert str(refused.value) == gone
    with pytest.raises(ValueError, match=r"missing\.gguf: no such GGUF file"):
        load_causal_lm(missing, None, None)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr("distill.pretrained.find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"model\.gguf: reading a GGUF file needs the gguf package: pip "
                       r"install 'distill\[gguf\]'"):  # fmt: skip
        StudentModule(model=str(tmp_path / "model.gguf"))  # loads its tokenizer
