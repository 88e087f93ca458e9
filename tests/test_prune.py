"""Structured pruning (distill/prune): importance, what is kept, the sliced model, the ``prune`` command."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distill.data.batch import TokenBatch
from distill.prune.apply import prune_model
from distill.prune.importance import measure
from distill.prune.options import Pruning, PruningError
from distill.prune.selection import check_budget, choose
from tests.helpers import TINY_LLAMA, clean_env, run

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def tiny(model_type: str = "llama", layers: int = 4, **sizes):
    torch.manual_seed(0)
    shape = {**TINY_LLAMA, "model_type": model_type, "num_hidden_layers": layers, "vocab_size": 64, **sizes}
    config = AutoConfig.for_model(**shape, architectures=[ARCHITECTURES[model_type]])
    return AutoModelForCausalLM.from_config(config).eval()


def batches() -> list[TokenBatch]:
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding is left out of every score
    return [TokenBatch(input_ids=ids, labels=ids, attention_mask=mask)]


def pruned(model, pruning: Pruning):
    pruning.check(model.config)
    return prune_model(model, choose(measure(model, batches()), pruning, model.config))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(batches()[0].input_ids).logits


def test_a_layer_made_an_identity_ranks_least_important_and_depth_pruning_keeps_the_others():
    model = tiny(layers=4)
    with torch.no_grad():
        for weight in (
            model.model.layers[2].self_attn.o_proj.weight,
            model.model.layers[2].mlp.down_proj.weight,
        ):
            weight.zero_()
    importance = measure(model, batches())
    assert min(range(4), key=lambda i: importance.layers[i]) == 2
    assert importance.layers[2] == pytest.approx(0, abs=1e-6)
    assert measure(model, batches(), "loss").layers[2] == pytest.approx(0, abs=1e-5)
    small = prune_model(model, choose(importance, Pruning(num_layers=3), model.config))
    assert small.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2]
    for new, old in zip(small.model.layers, (0, 1, 3), strict=True):
        for name, tensor in model.model.layers[old].state_dict().items():
            assert torch.equal(new.state_dict()[name], tensor), (old, name)
    # an identity layer's removal changes nothing
    torch.testing.assert_close(logits(small), logits(model))


def test_depth_pruning_drops_the_first_and_last_layers_only_when_asked():
    model = tiny(layers=4)
    importance = measure(model, batches())
    importance.layers = [0.0, 5.0, 4.0, 0.1]
    assert choose(importance, Pruning(num_layers=2), model.config).layers == [0, 3]
    loose = Pruning(num_layers=2, keep_first_last=False)
    assert choose(importance, loose, model.config).layers == [1, 2]


def test_width_pruning_that_keeps_everything_is_the_original_model():
    model = tiny("qwen2")
    full = Pruning(intermediate_size=64, num_attention_heads=4, hidden_size=32, num_layers=4)
    torch.testing.assert_close(logits(pruned(model, full)), logits(model), rtol=0, atol=0)


def test_mlp_channels_that_never_fire_are_the_ones_pruned():
    model = tiny()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[1::2] = 0  # odd channels output 0 everywhere
    small = pruned(model, Pruning(intermediate_size=32))
    assert small.config.intermediate_size == 32
    torch.testing.assert_close(logits(small), logits(model))
    old, new = model.model.layers[0].mlp, small.model.layers[0].mlp
    assert torch.equal(new.gate_proj.weight, old.gate_proj.weight[0::2])
    assert torch.equal(new.down_proj.weight, old.down_proj.weight[:, 0::2])


def test_head_pruning_keeps_whole_kv_groups():
    model = tiny("qwen2")  # 4 query heads over 2 KV heads, head_dim 8, biases on q/k/v
    with torch.no_grad():
        for layer in model.model.layers:  # KV group 0 (query heads 0 and 1) outputs nothing
            layer.self_attn.v_proj.weight[:8] = 0
            layer.self_attn.v_proj.bias[:8] = 0
    small = pruned(model, Pruning(num_attention_heads=2))
    assert (small.config.num_attention_heads, small.config.num_key_value_heads, small.config.head_dim) == (
        2,
        1,
        8,
    )
    old, new = model.model.layers[1].self_attn, small.model.layers[1].self_attn
    assert torch.equal(new.q_proj.weight, old.q_proj.weight[16:])  # query heads 2 and 3
    assert torch.equal(new.q_proj.bias, old.q_proj.bias[16:])
    assert torch.equal(new.k_proj.weight, old.k_proj.weight[8:])
    assert torch.equal(new.o_proj.weight, old.o_proj.weight[:, 16:])
    torch.testing.assert_close(logits(small), logits(model))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_a_pruned_model_saves_and_reloads_with_equal_logits(tmp_path, model_type):
    model = tiny(model_type, layers=3)
    small = pruned(model, Pruning(num_layers=2, intermediate_size=48, num_attention_heads=2, hidden_size=24))
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again) is type(model)
    assert (again.config.hidden_size, again.config.head_dim, again.config.num_hidden_layers) == (24, 8, 2)
    if model_type == "qwen2":
        assert again.config.layer_types == ["full_attention"] * 2
    torch.testing.assert_close(logits(again), logits(small), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("pruning", "message"),
    [
        (Pruning(num_layers=5), "pruning.num_layers is 5: the model has 4, so it must be in [2, 4]"),
        (Pruning(num_layers=1), "must be in [2, 4] with keep_first_last"),
        (Pruning(intermediate_size=65), "pruning.intermediate_size is 65: the model has 64"),
        (Pruning(hidden_size=33), "pruning.hidden_size is 33: the model has 32"),
        (Pruning(num_attention_heads=3), "heads are pruned in whole KV groups: give a multiple of 2"),
        (Pruning(num_layers=2, max_params=10**6), "num_layers and pruning.max_params both set"),
    ],
)
def test_targets_the_model_cannot_take_are_refused(pruning, message):
    with pytest.raises(PruningError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pruning.check(tiny().config)


def test_a_parameter_budget_drops_layers_until_it_fits_and_an_impossible_one_is_refused():
    model = tiny(layers=4)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    importance = measure(model, batches())
    importance.layers = [9.0, 1.0, 2.0, 9.0]
    assert choose(importance, Pruning(max_params=total - per_layer), model.config).layers == [0, 2, 3]
    assert choose(importance, Pruning(max_params=total - per_layer - 1), model.config).layers == [0, 3]
    with pytest.raises(PruningError, match="2 layer\\(s\\) \\(the fewest allowed, keep_first_last\\)"):
        check_budget(model.config, Pruning(max_params=total - 2 * per_layer - 1))


def test_an_unsupported_architecture_is_refused_by_name():
    config = AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(PruningError, match="this model is GPT2LMHeadModel"):
        Pruning().check(config)


def test_the_prune_command_writes_a_loadable_model_with_its_scores(tmp_path, teacher_dir, chat_file):
    data = {"train_files": str(chat_file), "template": "mistral", "max_seq_length": 64, "batch_size": 8}
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(teacher_dir), "--output", str(out), "--data", json.dumps(data)]
    result = run([*args, "--pruning.num_layers", "2", "--pruning.intermediate_size", "32"], clean_env())
    assert "[prune]" in result.stderr and "layers kept [0, 1] of 2" in result.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.intermediate_size) == (2, 32)
    assert (out / "tokenizer_config.json").is_file()
    scores = json.loads((out / "importance.json").read_text())
    assert scores["layers"]["kept"] == [0, 1] and len(scores["mlp_channels"]["kept"][0]) == 32
    assert scores["params_after"] < scores["params_before"]
    # bad input: refused with the option's name before any work (nothing written)
    refused = run(
        [*args[:4], str(tmp_path / "other"), "--pruning.num_attention_heads", "3"], clean_env(), check=False
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "give a multiple of 2" in refused.stderr and not (tmp_path / "other").exists()
    again = run([*args, "--pruning.num_layers", "2"], clean_env(), check=False)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
