"""Quantized loading (QLoRA): the BitsAndBytesConfig built from the options, and every refusal a machine
without CUDA or bitsandbytes meets at start-up (the CUDA path itself needs a GPU: not run here)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import distill.train.quantization as quantization_module
from distill.commands import main
from distill.objectives import GRPO
from distill.objectives.kto import KTO
from distill.objectives.preference import Preference
from distill.objectives.reference import Reference
from distill.rewards.builtin import Length
from distill.rewards.model import ModelReward
from distill.teacher.module import Teacher, TeacherModule
from distill.train.flops import model_shape
from distill.train.model import LoraOptions
from distill.train.quantization import Quantization, unavailable_reason
from distill.train.student import StudentModule
from tests.helpers import ROOT, TINY_LLAMA, TOKENIZER_DIR

NO_CUDA = (
    "load_in_4bit needs a CUDA GPU and the bitsandbytes package (pip install -e '.[bnb]'); "
    "this machine has no CUDA device"
)


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as any machine without a GPU (the same refusals where the tests run on one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def loadable(monkeypatch):
    """As if CUDA and bitsandbytes were there: the checks after theirs become reachable."""
    monkeypatch.setattr(quantization_module, "unavailable_reason", lambda: None)


def test_the_4bit_config_holds_the_options():
    config = Quantization(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype="float16",
    ).config()
    assert isinstance(config, BitsAndBytesConfig)  # built without bitsandbytes installed
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "fp4"
    assert config.bnb_4bit_use_double_quant is False
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert config.to_dict()["quant_method"] == "bitsandbytes"


def test_the_defaults_are_qlora_and_8bit_sets_8bit_only():
    default = Quantization(load_in_4bit=True).config()
    assert (default.bnb_4bit_quant_type, default.bnb_4bit_use_double_quant) == ("nf4", True)
    assert default.bnb_4bit_compute_dtype == torch.bfloat16
    eight = Quantization(load_in_8bit=True).config()
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert Quantization(load_in_8bit=True).identity() == "8bit"
    assert Quantization(load_in_4bit=True).identity() == "4bit-nf4-double-bfloat16"


@pytest.mark.parametrize(
    ("bits", "told"), [({"load_in_8bit": True, "load_in_4bit": True}, "both are set"), ({}, "neither is set")]
)
def test_one_width_exactly(loadable, bits, told):
    with pytest.raises(
        ValueError, match=f"model.quantization: set exactly one of load_in_8bit and load_in_4bit \\({told}\\)"
    ):
        Quantization(**bits).check("model.quantization")


def test_the_reason_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert unavailable_reason() == "this machine has no CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(quantization_module.importlib.util, "find_spec", lambda name: None)
    assert unavailable_reason() == "bitsandbytes is not installed"


def test_a_quantized_student_is_refused_without_cuda(no_cuda):
    with pytest.raises(ValueError) as error:
        StudentModule(
            model="some/model",
            tokenizer=str(TOKENIZER_DIR),
            lora=LoraOptions(),
            quantization=Quantization(load_in_4bit=True),
        )
    assert str(error.value) == f"model.quantization: {NO_CUDA}"


def test_a_quantized_teacher_is_refused_without_cuda(no_cuda):
    with pytest.raises(ValueError) as error:
        Teacher(model="some/teacher", quantization=Quantization(load_in_8bit=True))
    assert str(error.value).startswith("teacher some/teacher quantization: load_in_8bit needs a CUDA GPU")


@pytest.mark.parametrize(
    "objective",
    [
        lambda q: Preference(reference=Reference("model", quantization=q)),
        lambda q: KTO(reference=Reference("model", quantization=q)),
        lambda q: GRPO(
            rewards=[Length(max_tokens=8)], beta=0.1, reference=Reference("model", quantization=q)
        ),
    ],
    ids=["preference", "kto", "grpo"],
)
def test_a_quantized_reference_is_refused_without_cuda(no_cuda, objective):
    with pytest.raises(ValueError) as error:
        objective(Quantization(load_in_4bit=True))
    assert str(error.value) == f"objective.reference.quantization: {NO_CUDA}"


def test_a_quantized_reward_model_is_refused_without_cuda(no_cuda):
    with pytest.raises(ValueError) as error:
        ModelReward("some/reward-model", quantization=Quantization(load_in_4bit=True))
    assert str(error.value) == f"model_reward quantization: {NO_CUDA}"


def test_the_cli_stops_before_any_work(no_cuda, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config's relative runs/, out/ and checkpoint dirs would land here
    monkeypatch.setenv("DISTILL_DATA_CACHE", str(tmp_path / "tokenized"))
    data = ROOT / "distill" / "assets" / "data"
    args = ["fit", "--config", str(ROOT / "configs" / "sft.yaml")]
    args += ["--model.init_args.tokenizer", str(TOKENIZER_DIR)]
    args += ["--data.init_args.train_files", str(data / "chat_train.jsonl")]
    args += ["--data.init_args.val_files", str(data / "chat_val.jsonl")]
    args += ["--model.init_args.quantization.load_in_4bit", "true", "--trainer.max_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: model.quantization: {NO_CUDA}"
    assert list(tmp_path.iterdir()) == []  # no tokenized cache, runs dir, checkpoint or export


def test_a_quantized_student_needs_lora_and_a_checkpoint(loadable):
    with pytest.raises(ValueError, match="a quantized student trains through a LoRA adapter only"):
        StudentModule(
            model="some/model", tokenizer=str(TOKENIZER_DIR), quantization=Quantization(load_in_4bit=True)
        )
    with pytest.raises(ValueError, match=r"quantized loading needs model\.model"):
        StudentModule(
            model_config=TINY_LLAMA,
            tokenizer=str(TOKENIZER_DIR),
            lora=LoraOptions(),
            quantization=Quantization(load_in_4bit=True),
        )


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_the_student_loads_quantized_and_prepares_for_kbit_training(
    loadable, monkeypatch, gradient_checkpointing
):
    """On a CPU the quantized load is stood in for by a tiny model flagged 4-bit, as transformers flags
    one: what the student asks of the loader and does with the model is what a GPU run does."""
    asked = {}

    def fake_load(
        name_or_path,
        config,
        tokenizer,
        dtype=None,
        role="student",
        quantization=None,
        device=None,
        options=None,
    ):
        asked.update(name=name_or_path, config=quantization.config(), device=device, options=options)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**TINY_LLAMA, vocab_size=len(tokenizer))
        )
        model.is_loaded_in_4bit = True
        return model

    monkeypatch.setattr("distill.train.student.load_causal_lm", fake_load)
    student = StudentModule(
        model="some/model",
        tokenizer=str(TOKENIZER_DIR),
        lora=LoraOptions(r=4, alpha=8),
        quantization=Quantization(load_in_4bit=True),
        gradient_checkpointing=gradient_checkpointing,
        model_kwargs={"attn_implementation": "eager"},
    )
    student.configure_model()
    assert asked["name"] == "some/model" and asked["config"].load_in_4bit
    assert asked["options"] == {"attn_implementation": "eager"}
    # peft's preparation would turn checkpointing on by default: it follows the student's option
    assert student.causal_lm.is_activation_checkpointing is gradient_checkpointing
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the base is frozen, the adapter trains


def test_a_quantized_teacher_is_a_separate_cache_identity(loadable):
    plain = TeacherModule([Teacher(model="some/teacher")], tokenizer=str(TOKENIZER_DIR))
    quantized = TeacherModule(
        [Teacher(model="some/teacher", quantization=Quantization(load_in_4bit=True))],
        tokenizer=str(TOKENIZER_DIR),
    )
    assert "quantization" not in plain.identity(0)  # caches collected before stay valid
    assert quantized.identity(0)["quantization"] == "4bit-nf4-double-bfloat16"


def test_an_adapter_reference_refuses_a_reference_quantization(loadable):
    reference = Reference("auto", quantization=Quantization(load_in_4bit=True))
    from distill.data.facts import DataFacts
    from distill.objectives.context import Context, Origin, Policy

    lora_student = Context(
        None, DataFacts("a test", "pairs", 0), Policy(None, has_adapter=True), Origin("some/model")
    )
    with pytest.raises(ValueError, match="the 'adapter' reference is the student's own base"):
        reference.setup(lora_student, "Preference", chunk_size=1024)


def test_packed_4bit_weights_count_at_their_full_shape():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA, vocab_size=1000))
    expected = model_shape(model)
    for layer in model.model.layers:  # bitsandbytes packs two 4-bit weights per byte, in (n / 2, 1)
        full = layer.self_attn.q_proj.weight
        packed = torch.nn.Parameter(torch.zeros(full.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
        packed.quant_state = SimpleNamespace(shape=full.shape)
        layer.self_attn.q_proj.weight = packed
    assert model_shape(model).body_params == expected.body_params


def saved_adapter(tmp_path: Path, quantized_base: bool) -> Path:
    """A LoRA adapter whose base lies in ``tmp_path / base``; its config.json may say it is saved 4-bit."""
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA, vocab_size=32000)).save_pretrained(
        base
    )
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    adapter = tmp_path / "adapter"
    get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    ).save_pretrained(adapter)
    if quantized_base:
        config = json.loads((base / "config.json").read_text())
        config["quantization_config"] = Quantization(load_in_4bit=True).config().to_dict()
        config["quantization_config"]["quant_method"] = "bitsandbytes"
        config["quantization_config"]["bnb_4bit_compute_dtype"] = "bfloat16"
        (base / "config.json").write_text(json.dumps(config))
    return adapter


def test_merge_refuses_a_base_saved_quantized(tmp_path, capsys):
    adapter = saved_adapter(tmp_path, quantized_base=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"the base {tmp_path / 'base'} is saved quantized (bitsandbytes quantization_config" in err
    assert "pass --base with the unquantized model" in err
    assert not (tmp_path / "merged").exists()


def test_merge_of_an_unquantized_base_still_runs(tmp_path, capsys):
    adapter = saved_adapter(tmp_path, quantized_base=False)
    main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "config.json").exists()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_a_quantized_teacher_needs_a_checkpoint(loadable):
    with pytest.raises(ValueError, match="teacher t1 quantization: quantized loading needs"):
        Teacher(model_config=TINY_LLAMA, name="t1", quantization=Quantization(load_in_4bit=True))
