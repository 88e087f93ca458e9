"""`collect` and KD `fit` through the CLI with a teacher in its own chat template."""

import pytest
import torch
import yaml

from distill.cache import CacheReader
from distill.cli import main
from distill.teacher.alignment import target_positions
from tests.helpers import TINY_LLAMA, conversation, dataset_samples, logged_values, write_jsonl


def test_collect_with_a_teacher_in_its_own_template(tmp_path, chat_tokenizer_dir, chat_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = tmp_path / "instruct"
    config = AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(chat_tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    chat_tokenizer.save_pretrained(teacher)
    data = write_jsonl(tmp_path / "d.jsonl", [conversation(i, turns=1 + i % 3) for i in range(8)])
    cfg = {
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "distill.callbacks.TeacherCacheWriter",
                    "init_args": {"path": str(tmp_path / "cache"), "val_path": None},
                }
            ],
        },
        "model": {
            "class_path": "distill.TeacherModule",
            "init_args": {
                "tokenizer": str(chat_tokenizer_dir),
                "sparsity": {"k": 8},
                "teachers": [{"model": str(teacher), "name": "inst", "template": "llama3"}],
            },
        },
        "data": {
            "class_path": "distill.DataModule",
            "init_args": {
                "train_files": str(data),
                "template": "chatml",
                "batch_size": 3,
                "add_eot_to_stop_tokens": True,
                "max_seq_length": 90,
            },
        },
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["collect", "--config", str(path)])
    dm = dataset_samples(path)
    reader = CacheReader(tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    s_eot, t_eot = chat_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])
    from distill.data.templates import resolve_template
    from distill.teacher.alignment import encode_for_teacher

    views = encode_for_teacher(
        dm.train, chat_tokenizer, resolve_template(chat_tokenizer, "llama3"), dm.chat_template
    )
    for sample in dm.train:
        stored = reader.get(sample.sha)
        assert stored.ids.shape == (sample.num_trainable, 8)
        view = views[sample.sha]
        with torch.no_grad():
            logits = model(torch.tensor([view.teacher.input_ids])).logits[0]
        dense = logits[target_positions(view.teacher)][view.rows]
        dense[:, s_eot] = torch.logaddexp(dense[:, s_eot], dense[:, t_eot])
        dense[:, t_eot] = float("-inf")
        assert torch.equal(stored.ids, dense.topk(8).indices.sort().values)
        torch.testing.assert_close(stored.lse, torch.logsumexp(dense, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"packing": True, "cache_size_gb": 4.8e-5}])
def test_kd_fit_with_a_teacher_in_its_own_template(tmp_path, chat_tokenizer_dir, chat_tokenizer, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.helpers import kd_config

    torch.manual_seed(0)
    teacher = tmp_path / "instruct"
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(chat_tokenizer))
    ).save_pretrained(teacher)
    chat_tokenizer.save_pretrained(teacher)
    path = kd_config(
        tmp_path,
        teacher,
        n=12,
        template="chatml",
        add_eot_to_stop_tokens=True,
        teachers=[{"model": str(teacher), "name": "inst", "template": "llama3"}],
        **extra,
    )
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["init_args"]["tokenizer"] = str(chat_tokenizer_dir)
    path.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(path)])
    assert (tmp_path / "cache" / "train-chunks").is_dir() == ("cache_size_gb" in extra)
    assert len(logged_values(tmp_path, "train/kd")) == 6 and min(logged_values(tmp_path, "train/kd")) > 0
