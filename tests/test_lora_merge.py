"""LoRA: the exported adapter loads with peft, and merging it into the base keeps the logits."""

import torch
import yaml

from distill.commands import main
from distill.train.merge import merge_adapter
from tests.helpers import save_remote_code_adapter, write_config


def test_lora_fit_export_and_merge(tmp_path, chat_file):
    config = write_config(tmp_path, chat_file)
    lora = tmp_path / "lora.yaml"
    lora.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "init_args": {
                        "lora": {
                            "r": 4,
                            "alpha": 8,
                            "dropout": 0.0,
                            "target_modules": "all-linear",
                            "modules_to_save": ["lm_head"],
                        },
                    }
                }
            }
        )
    )
    main(["fit", "--config", str(config), "--config", str(lora), "--trainer.max_steps", "4"])
    export = tmp_path / "hf"
    assert (export / "adapter_config.json").exists() and (export / "base_model" / "config.json").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(export / "base_model")
    assert base.config.tie_word_embeddings
    adapted = PeftModel.from_pretrained(base, export).eval()
    ids = torch.tensor([[1, 415, 2936, 9060, 28723, 13]])
    with torch.no_grad():
        before = adapted(ids).logits
        plain = adapted.get_base_model()
    merged = merge_adapter(export, tmp_path / "merged").eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, before, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=1e-4, atol=1e-5)
        with adapted.disable_adapter():
            base_logits = plain(ids).logits
    # the adapter changed the model (otherwise equality above proves nothing)
    assert not torch.allclose(base_logits, before, atol=1e-4)
    # the tied head was trained apart from the embeddings: merging unties it rather than losing it
    assert reloaded.config.tie_word_embeddings is False
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()
    assert (tmp_path / "merged" / "chat_template.jinja").exists()


def test_merge_command_line(tmp_path, chat_file):
    config = write_config(tmp_path, chat_file)
    lora = tmp_path / "lora.yaml"
    lora.write_text(yaml.safe_dump({"model": {"init_args": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}}))
    eager = ["--model.model_kwargs", '{"attn_implementation": "eager"}']
    main(["fit", "--config", str(config), "--config", str(lora), "--trainer.max_steps", "2", *eager])
    main(["merge", "--adapter", str(tmp_path / "hf"), "--output", str(tmp_path / "merged")])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.tie_word_embeddings  # nothing untied it: the head was not trained
    assert not any("lora" in name for name, _ in model.named_parameters())

    # the base loads with the fit's from_pretrained arguments, unless told others
    assert merge_adapter(tmp_path / "hf", tmp_path / "again").config._attn_implementation == "eager"
    plain = merge_adapter(tmp_path / "hf", tmp_path / "again", model_kwargs={"attn_implementation": "sdpa"})
    assert plain.config._attn_implementation == "sdpa"


def test_merge_never_runs_a_base_models_code_because_the_adapter_folder_asks(tmp_path, capsys):
    """Issue 25 #1: the adapter's saved distill_config.yaml asked for trust_remote_code, and merging ran
    the base's modeling_*.py; only the user's own --model_kwargs turns it on."""
    adapter, marker = save_remote_code_adapter(tmp_path)
    main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    assert not marker.exists()
    note = capsys.readouterr().err
    assert f"{adapter / 'distill_config.yaml'} asks for trust_remote_code: true; not applied" in note
    assert """pass --model_kwargs '{"trust_remote_code": true}'""" in note
    assert (tmp_path / "merged" / "model.safetensors").exists()

    trusted = ["--model_kwargs", '{"trust_remote_code": true}']
    main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "trusted"), *trusted])
    assert marker.read_text() == "ran"


def test_a_saved_adapter_goes_on_training(tmp_path, teacher_dir):
    """``model.lora.adapter`` (MedicalGPT's --peft_path): the student starts as the saved adapter is, with
    its rank, and trains its LoRA weights only."""
    import pytest
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distill.train.model import LoraOptions
    from distill.train.student import StudentModule

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    saved = get_peft_model(AutoModelForCausalLM.from_pretrained(teacher_dir), config).eval()
    saved.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 415, 2936, 9060, 28723, 13]])

    student = StudentModule(model=str(teacher_dir), lora=LoraOptions(r=16, adapter=str(tmp_path / "adapter")))
    student.configure_model()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student.model(ids).logits, saved(ids).logits)
        with saved.disable_adapter():
            assert not torch.allclose(saved(ids).logits, student.model(ids).logits, atol=1e-4)
    trainable = [name for name, p in student.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert student.model.peft_config["default"].r == 2

    with pytest.raises(FileNotFoundError, match=r"holds no adapter_config\.json"):
        StudentModule(model=str(teacher_dir), lora=LoraOptions(adapter=str(tmp_path))).configure_model()
