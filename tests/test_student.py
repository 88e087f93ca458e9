import copy
import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from distill.data.batching import Collator
from distill.data.encoding import IGNORE_INDEX, Encoded
from distill.train.metrics import ObjectiveMetrics
from distill.train.optim import AdamW, AdamW8bit
from distill.train.schedule import WarmupDecay
from distill.train.student import StudentModule
from tests.helpers import TINY_LLAMA, TOKENIZER_DIR


def tiny_student(**kwargs) -> StudentModule:
    torch.manual_seed(0)
    module = StudentModule(model_config=TINY_LLAMA, tokenizer=str(TOKENIZER_DIR), **kwargs)
    module.configure_model()
    return module


def micro_batches() -> list[dict]:
    """Two micro-batches with very different numbers of trainable tokens."""
    generator = torch.Generator().manual_seed(1)
    collate = Collator(pad_id=0)

    def sample(length: int, prompt: int) -> Encoded:
        ids = torch.randint(3, 1000, (length,), generator=generator).tolist()
        return Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:], "", "")

    return [collate([sample(20, 2), sample(16, 4)]), collate([sample(10, 8)])]


def test_gradient_is_the_token_mean_over_the_whole_accumulation_step():
    module = tiny_student(
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        scheduler=partial(WarmupDecay, decay="constant"),
    )
    reference = copy.deepcopy(module.model)
    batches = micro_batches()

    # reference: one mean over every trainable token of both micro-batches
    total_loss, total_tokens = 0.0, 0
    for batch in batches:
        logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        labels = batch.labels[:, 1:]
        total_loss = total_loss + F.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_tokens += int((labels != IGNORE_INDEX).sum())
    (total_loss / total_tokens).backward()
    expected = {n: p.detach() - p.grad for n, p in reference.named_parameters()}

    trainer = L.Trainer(
        max_steps=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    for name, param in module.model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_per_micro_batch_mean_would_differ():
    """Guards the test above: the two normalisations really give different gradients on this data."""
    batches = micro_batches()
    counts = [int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    assert counts[0] > 3 * counts[1]


def test_a_test_run_logs_under_test_and_a_validation_under_val():
    """``trainer.test`` logged its metrics as ``val/``: a test set's loss read as the validation loss."""
    module = tiny_student()
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    loader = DataLoader(micro_batches(), batch_size=None)
    tested = trainer.test(module, dataloaders=loader, verbose=False)[0]
    validated = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    assert "test/loss" in tested and [key for key in tested if not key.startswith("test/")] == []
    assert tested == {key.replace("val/", "test/", 1): value for key, value in validated.items()}


def test_lora_trains_only_the_adapter():
    from distill.train.model import LoraOptions

    module = tiny_student(lora=LoraOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and not any("k_proj" in n for n in trainable)


def test_warmup_then_cosine_schedule():
    module = tiny_student(
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        scheduler=partial(WarmupDecay, decay="cosine", warmup_steps=2),
    )
    trainer = L.Trainer(max_steps=10, logger=False, accelerator="cpu")
    module.trainer = trainer
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert lrs[2] > lrs[5] > lrs[9] > 0
    # weight decay is not applied to norms
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in optimizer.param_groups[1]["params"])
    assert all(p.ndim == 2 for p in optimizer.param_groups[0]["params"])
    assert len(optimizer.param_groups[1]["params"]) == 2 * TINY_LLAMA["num_hidden_layers"] + 1  # + final norm


def test_warmup_ratio_is_a_share_of_the_run_and_excludes_warmup_steps():
    module = tiny_student(
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0), scheduler=partial(WarmupDecay, warmup_ratio=0.25)
    )
    module.trainer = L.Trainer(max_steps=20, logger=False, accelerator="cpu")
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # 5 warmup steps of 20
    with pytest.raises(
        ValueError, match=r"scheduler\.warmup_steps and model\.scheduler\.warmup_ratio both set"
    ):
        WarmupDecay(optimizer, 20, warmup_steps=2, warmup_ratio=0.1)
    with pytest.raises(
        ValueError, match=r"model\.scheduler\.warmup_ratio is a share .* in \[0, 1\): got 1\.0"
    ):
        WarmupDecay(optimizer, 20, warmup_ratio=1.0)


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [{}, {"warmup_steps": 3}, {"warmup_ratio": 0.1}])
def test_warmup_decay_steps_as_transformers_get_scheduler(decay, warmup):
    """The schedule the configs' ``lr_schedule``/``warmup_*`` keys gave through transformers'
    ``get_scheduler``: the same learning rate, to the bit, at every step and past the run's end."""
    from transformers import get_scheduler

    def learning_rates(scheduler_of) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        scheduler, lrs = scheduler_of(optimizer), []
        for _ in range(24):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs

    steps = 20
    warmup_steps = warmup.get("warmup_steps") or round(warmup.get("warmup_ratio", 0.0) * steps)
    name = "constant_with_warmup" if decay == "constant" else decay
    expected = learning_rates(
        lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=steps)
    )
    assert learning_rates(lambda opt: WarmupDecay(opt, steps, decay, **warmup)) == expected


def test_model_kwargs_reach_from_pretrained(tmp_path):
    from tests.helpers import save_tiny_teacher

    path = str(save_tiny_teacher(tmp_path / "model"))
    for implementation in ("eager", "sdpa"):
        student = StudentModule(model=path, model_kwargs={"attn_implementation": implementation})
        student.configure_model()
        assert student.causal_lm.config._attn_implementation == implementation


def test_adamw_fused_only_on_cuda():
    param = torch.nn.Parameter(torch.zeros(2))
    assert AdamW([param]).defaults["fused"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_8bit_adamw_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(2))])


def test_validate_then_fit_in_one_process(tmp_path):
    """A validation before training (a baseline) leaves metric states a later fit can update."""
    from distill.cli import run_cli
    from tests.helpers import conversation, write_config, write_jsonl

    chats = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(10)])
    config = write_config(tmp_path, chats)
    cli = run_cli(
        ["--config", str(config), "--trainer.max_steps", "2", "--trainer.callbacks", "[]"], run=False
    )
    (before,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 and before["val/loss"] > 0


def test_a_loaded_model_trains_in_train_mode(tmp_path):
    """from_pretrained returns a model in eval mode and Lightning keeps the modes it finds: dropout and
    gradient checkpointing would be off in training."""
    from tests.helpers import save_tiny_teacher

    student = StudentModule(model=str(save_tiny_teacher(tmp_path / "model")), gradient_checkpointing=True)
    student.configure_model()
    assert student.model.training and all(module.training for module in student.model.modules())
    assert student.causal_lm.is_gradient_checkpointing


def test_perplexity_is_logged_only_for_a_cross_entropy():
    loss_sum, tokens = torch.tensor(6.0), 4

    def computed(**options) -> dict[str, float]:
        metrics = ObjectiveMetrics(**options)
        extra = {"ce": torch.tensor(2.0)} if "ce" in options.get("extra", ()) else {}
        metrics.update(loss_sum, None, units=tokens, tokens=tokens, **extra)
        return {name: float(value) for name, value in metrics.compute().items()}

    assert computed(loss_is_cross_entropy=True)["ppl"] == pytest.approx(math.exp(1.5))
    assert computed(extra=("ce",))["ppl"] == pytest.approx(math.exp(0.5))  # KD: of its CE, not its loss
    assert "ppl" not in computed()  # a token-level policy loss (GRPO's dapo)
    assert "ppl" not in computed(unit="pair", loss_is_cross_entropy=False)


def test_neftune_noises_the_embeddings_of_training_forwards_only():
    with pytest.raises(ValueError, match="neftune_alpha"):
        StudentModule(model_config=TINY_LLAMA, tokenizer=str(TOKENIZER_DIR), neftune_alpha=0.0)
    alpha = 5.0
    module = tiny_student(neftune_alpha=alpha)
    embeddings = module.model.get_input_embeddings()
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    clean = embeddings.weight[ids].detach()
    bound = alpha / math.sqrt(16 * clean.size(-1))

    module.train()
    noise = embeddings(ids).detach() - clean
    assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.9 * bound  # uniform in +-bound
    assert noise.abs().mean() == pytest.approx(bound / 2, rel=0.05)
    assert not torch.equal(embeddings(ids), embeddings(ids))  # fresh noise each forward
    with torch.no_grad():  # a reference or rollout forward of the same model
        assert torch.equal(embeddings(ids), clean)
    module.eval()
    assert torch.equal(embeddings(ids).detach(), clean)
