"""A run that can be trusted: pre-emption saves and says so, DeepSpeed's accumulated gradient is the token
mean, norms and biases are never decayed, and a bad config value is one clear line."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from distill.callbacks import PreemptionCheckpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

from distill import DataModule, Distillation, KDDataModule, PreferenceDataModule, PromptDataModule
from distill.cli import main
from distill.commands import main as run_command
from distill.data.batch import TokenBatch
from distill.objectives import GRPO, KTO, CrossEntropy, OnPolicyDistillation, Preference
from distill.objectives.context import Step
from distill.rollout import Sampling
from distill.teacher.sparse import Sparsity
from distill.train.optim import AdamW
from distill.train.schedule import WarmupDecay
from distill.train.student import StudentModule
from tests.helpers import (
    ROOT,
    TINY_LLAMA,
    TOKENIZER_DIR,
    check_stopped_fit_resumes,
    clean_env,
    conversation,
    kd_config,
    losses,
    run,
    with_last_checkpoint,
    write_config,
    write_jsonl,
)

# ---- item 3: SIGTERM / SIGUSR1 ----------------------------------------------------------------------


def checkpointing_rarely(config: dict, directory: Path) -> Path:
    """``config`` with a ModelCheckpoint that saves ``directory/checkpoints/last.ckpt`` only every 100
    steps (any checkpoint of a 10-step run is the pre-emption's), written to ``directory/run.yaml``."""
    config["trainer"]["enable_checkpointing"] = True
    path = with_last_checkpoint(config, directory)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100
    path.write_text(yaml.safe_dump(config))
    return path


def preemptible_config(directory: Path, **trainer: object) -> Path:
    """The SFT test run, checkpointing rarely."""
    directory.mkdir()
    train = write_jsonl(directory / "train.jsonl", [conversation(i, turns=1 + i % 3) for i in range(16)])
    config = yaml.safe_load(write_config(directory, train, val_fraction=0.0, max_seq_length=96).read_text())
    config["trainer"].update(trainer)
    return checkpointing_rarely(config, directory)


def test_sigterm_saves_last_checkpoint_exits_143_and_resumes_exactly(tmp_path):
    """SIGTERM while step 5 trains: the fit finishes that step, saves last.ckpt at step 6 and exits 143;
    ``--ckpt_path last`` then logs steps 6-9 with the losses of an uninterrupted 10-step run."""
    steps = ["--trainer.max_steps", "10", "--trainer.enable_checkpointing", "true"]
    term = {"class_path": "tests.probes.TermAt", "init_args": {"step": 5}}
    stopped = check_stopped_fit_resumes(
        tmp_path, lambda name: preemptible_config(tmp_path / name), steps, term, returncode=143
    )
    assert "SIGTERM at step 6" in stopped.stderr and "resume with --ckpt_path last" in stopped.stderr
    (stopped_log,) = (tmp_path / "resumed").rglob("version_0")
    assert sorted(losses(stopped_log)) == list(range(6))  # it stopped after the step in flight


def test_sigusr1_amid_accumulation_saves_at_the_step_boundary_and_exports_nothing(tmp_path):
    """SLURM's ``--signal=USR1@90``: sent at the first of two micro-batches of step 2, the fit completes
    the optimizer step (a checkpoint amid accumulation would drop the gradients), saves it at step 3,
    exits 128 + 10, and writes no Hugging Face export of the unfinished model."""
    config = preemptible_config(tmp_path / "run", accumulate_grad_batches=2)
    term = {"class_path": "tests.probes.TermAt", "init_args": {"step": 2, "signal_name": "SIGUSR1"}}
    export = {"class_path": "distill.callbacks.HFExport", "init_args": {"dirpath": str(tmp_path / "hf")}}
    args = ["fit", "--config", str(config), "--trainer.max_steps", "10", "--trainer.callbacks+"]

    # a handler of the test's own, so that a fit which ignores the signal fails this test, not pytest
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(SystemExit) as stop:
            main([*args, json.dumps(export), "--trainer.callbacks+", json.dumps(term)])
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]  # after the fit, the signal goes where it went before
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert stop.value.code == 138
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert not (tmp_path / "hf").exists()


def test_ctrl_c_saves_last_checkpoint_at_the_step_boundary_and_exits_130(tmp_path):
    """Ctrl-C (SIGINT, sent to the terminal's whole process group, DataLoader workers too) stops like
    SIGTERM: Lightning alone raised KeyboardInterrupt amid the step and exited 1 with nothing saved, and
    a worker that dies of it fails the fit ("DataLoader worker ... exited unexpectedly")."""
    config = preemptible_config(tmp_path / "run")
    term = {
        "class_path": "tests.probes.TermAt",
        "init_args": {"step": 2, "signal_name": "SIGINT", "children": True},
    }
    args = ["fit", "--config", str(config), "--trainer.max_steps", "10", "--data.init_args.num_workers", "1"]
    args += ["--trainer.callbacks+", json.dumps(term)]
    previous = signal.getsignal(signal.SIGINT)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    # a terminal's Ctrl-C, whatever an earlier test left in this worker (the merged suite's order left
    # SIGINT ignored, SIG_IGN, which the pre-emption callback rightly leaves alone: nohup's jobs)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    try:
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 130
        with pytest.raises(KeyboardInterrupt):  # after the fit Ctrl-C interrupts as it did before
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    directory = tmp_path / "run" / "checkpoints"
    assert torch.load(directory / "last.ckpt", weights_only=False)["global_step"] == 3
    assert os.listdir(directory) == ["last.ckpt"]


def test_a_preemption_save_that_dies_midway_keeps_the_previous_last_checkpoint(tmp_path):
    """The checkpoint is written beside last.ckpt and renamed over it: a write that stops after part
    of the bytes (Lightning's writer copies its staged file over the target in place when the system's
    temp directory is another file system) leaves the previous last.ckpt whole and no temporary file;
    the next save replaces it."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    torch.save({"global_step": 3}, directory / "last.ckpt")

    def dies_midway(path: str | Path) -> None:
        Path(path).write_bytes(b"PK\x03\x04 the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    trainer = SimpleNamespace(
        global_step=5,
        world_size=1,
        is_global_zero=True,
        default_root_dir=str(tmp_path),
        checkpoint_callback=ModelCheckpoint(dirpath=directory),
        strategy=SimpleNamespace(barrier=lambda name=None: None),
        save_checkpoint=dies_midway,
    )
    callback = PreemptionCheckpoint()
    callback.setup(trainer, None, "fit")
    try:
        callback.on_train_start(trainer, None)
        callback.on_train_batch_start(trainer)
        os.kill(os.getpid(), signal.SIGTERM)
        trainer.global_step = 6
        with pytest.raises(OSError, match="No space left"):
            callback.on_train_batch_end(trainer)
        assert torch.load(directory / "last.ckpt")["global_step"] == 3
        assert os.listdir(directory) == ["last.ckpt"]
        trainer.save_checkpoint = lambda path: torch.save({"global_step": 7}, path)
        callback.on_train_batch_start(trainer)  # the next optimizer step
        trainer.global_step = 7
        callback.on_train_batch_end(trainer)
    finally:
        callback.teardown(trainer, None, "fit")
    assert torch.load(directory / "last.ckpt")["global_step"] == 7
    assert os.listdir(directory) == ["last.ckpt"]


def test_sigterm_to_one_ddp_rank_stops_every_rank_after_one_collective_save(tmp_path):
    """A checkpoint of a sharded model is a collective: a signal that reaches rank 0 alone (a local
    ``kill``) must make both ranks save the same step and exit, not leave rank 1 waiting."""
    config = preemptible_config(tmp_path / "run")
    term = {"class_path": "tests.probes.TermAt", "init_args": {"step": 3, "rank": 0}}
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    args = ["fit", "--config", str(config), "--trainer.max_steps", "10", *ddp]
    stopped = run([*args, "--trainer.callbacks+", json.dumps(term)], clean_env(), check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4


def test_sigterm_to_every_process_of_a_kd_fit_with_workers_still_saves(tmp_path, kd_teacher_dir):
    """SLURM signals every process of the job, the DataLoader workers too: PyTorch's worker handler dies
    of a SIGTERM, and the main process then fails with "DataLoader worker ... is killed" (exit 1, no
    checkpoint) unless the workers leave the signal to it."""
    config = yaml.safe_load(kd_config(tmp_path, kd_teacher_dir, num_workers=1).read_text())
    path = checkpointing_rarely(config, tmp_path)
    term = {"class_path": "tests.probes.TermAt", "init_args": {"step": 3, "children": True}}
    args = ["fit", "--config", str(path), "--trainer.max_steps", "10", "--trainer.callbacks+"]
    stopped = run([*args, json.dumps(term)], clean_env(), check=False)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4


def test_sigterm_before_training_exits_143_not_0(tmp_path, chat_file):
    """Outside the training steps Lightning's own SIGTERM stop applies (nothing trained to save): it
    raises a SystemExit without a code, which a scheduler would read as success."""
    probe = json.dumps({"class_path": "tests.probes.TermInSanityCheck"})
    config = write_config(tmp_path, chat_file)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--trainer.callbacks+", probe])
    assert stop.value.code == 143


# ---- item 9: DeepSpeed and gradient accumulation ----------------------------------------------------


def test_deepspeed_accumulated_loss_is_the_token_mean(monkeypatch):
    """Lightning divides the returned loss by ``accumulate_grad_batches`` (A), and DeepSpeed's
    ``engine.backward`` divides it by A again (``scale_wrt_gas``); over A micro-batches the loss that is
    backpropagated must still be the mean over trainable tokens, not 1/A of it."""
    accumulate = 4
    torch.manual_seed(0)
    module = StudentModule(model_config=TINY_LLAMA, tokenizer=str(TOKENIZER_DIR))
    module.configure_model()
    module._trainer = SimpleNamespace(
        strategy=DeepSpeedStrategy(stage=2), accumulate_grad_batches=accumulate, world_size=1
    )
    monkeypatch.setattr(module, "log_dict", lambda *args, **kwargs: None)
    monkeypatch.setattr(module, "current_step", lambda: Step(training=True))
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = TokenBatch(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))

    returned = module.training_step(batch, 0)["loss"]
    backpropagated = sum(returned / accumulate / accumulate for _ in range(accumulate))
    out, _ = module.compute_loss(batch)
    assert torch.allclose(backpropagated, out.loss_sum / out.num_tokens, rtol=1e-5)


# ---- item 12: weight decay ---------------------------------------------------------------------------

TINY_CONFIGS = {
    "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64},
    "bloom": {"n_layer": 2, "hidden_size": 32, "n_head": 4},
    "falcon": {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "new_decoder_architecture": True,
        "num_kv_heads": 2,
        "bias": True,
    },
    "llama": {k: v for k, v in TINY_LLAMA.items() if k != "model_type"},
}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_norms_and_biases_are_not_decayed_and_matrices_are(model_type):
    torch.manual_seed(0)
    config = {"model_type": model_type, **TINY_CONFIGS[model_type]}
    module = StudentModule(
        model_config=config,
        tokenizer=str(TOKENIZER_DIR),
        optimizer=lambda params: AdamW(params, weight_decay=0.1),
    )
    module.configure_model()
    module._trainer = SimpleNamespace(strategy=None, estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    norms = {
        f"{name}.{param_name}"
        for name, sub in module.named_modules()
        if isinstance(sub, nn.LayerNorm) or "RMSNorm" in type(sub).__name__
        for param_name, _ in sub.named_parameters(recurse=False)
    }
    assert norms  # the test sees the model's norms
    for name, param in module.named_parameters():
        if name in norms or name.endswith("bias"):
            assert decay_of[id(param)] == 0.0, name
        else:
            assert param.ndim == 2 and decay_of[id(param)] == 0.1, name


# ---- item 16: config errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "wanted"),
    [
        ("--model.init_args.objective.init_args.loss", "nonsense", ["'nonsense'", "forward_kl", "jsd"]),
        ("--model.init_args.objective.init_args.alpha", "1.5", ["alpha", "[0, 1]", "1.5"]),
        ("--data.init_args.cache_size_gb", "-1", ["cache_size_gb", "-1", "null"]),
        ("--model.init_args.objective.init_args.chunk_size", "-4", ["chunk_size must be >= 1, got -4"]),
        (
            "--data.init_args.teachers",
            json.dumps([{"model": "/no/such/teacher", "name": "t1"}]),
            ["teacher t1: /no/such/teacher: no such directory (/no/such/teacher does not exist)"],
        ),
        (
            "--data.init_args.teachers",
            json.dumps([{"model": "/no/such/teacher.gguf", "name": "t1"}]),
            ["teacher t1: /no/such/teacher.gguf: no such GGUF file (/no/such/teacher.gguf does not exist)"],
        ),
        (  # the student's tokenizer (model.model's, when unset)
            "--model.init_args.tokenizer",
            "/no/such/student.gguf",
            ["model.tokenizer /no/such/student.gguf: no such GGUF file (/no/such/student.gguf does not"],
        ),
        (  # not HF's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
            "--model.init_args.model",
            "/no/such/student",
            ["model.model /no/such/student: no such directory (/no/such/student does not exist)"],
        ),
    ],
    ids=[
        "loss", "alpha", "cache_size_gb", "chunk_size", "missing_teacher", "teacher_gguf", "student_gguf",
        "missing_student",
    ],
)  # fmt: skip
def test_a_bad_value_is_one_clear_error_before_any_work(tmp_path, kd_teacher_dir, capfd, flag, value, wanted):
    check_one_clear_error(tmp_path, kd_teacher_dir, capfd, [flag, value], wanted)


def test_a_student_gguf_without_the_gguf_package_is_one_line(tmp_path, kd_teacher_dir, capfd, monkeypatch):
    """Issue 29: an ImportError, printed as a traceback (under the Union subtypes list when the student's
    tokenizer is the file's)."""
    student = tmp_path / "student.gguf"
    student.write_bytes(b"GGUF")
    monkeypatch.setattr("distill.pretrained.find_spec", lambda name: None)
    args = ["--model.init_args.model", str(student), "--model.init_args.tokenizer", "null"]
    wanted = f"model.model {student}: reading a GGUF file needs the gguf package: pip install 'distill[gguf]'"
    check_one_clear_error(tmp_path, kd_teacher_dir, capfd, args, [wanted])


def check_one_clear_error(tmp_path: Path, teacher: Path, capfd, args: list[str], wanted: list[str]) -> None:
    """``fit`` with ``args`` over a KD config ends, exit 2, with one line holding ``wanted``, nothing done."""
    config = kd_config(tmp_path, teacher)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), *args])
    assert stop.value.code == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    # what precedes it are the one-line notes of seeding; then our message, alone, and nothing after it
    (error,) = [line for line in lines if not line.startswith("Seed set to")]
    assert error == lines[-1] and error.startswith("error: ")
    assert all(word in error for word in wanted), error
    assert "Traceback" not in err and "Union subtypes" not in err
    assert not (tmp_path / "cache").exists()  # nothing was collected


def test_a_student_path_that_can_only_be_local_must_be_there(tmp_path, monkeypatch):
    """The rule is the teacher's (``check_model_source``): absolute, ``./``, ``../``, ``~`` or
    ``dir/name`` under an existing ``dir`` is a local path; any other name may be the hub's (a hub
    name is still accepted, its loading left to the fit)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    tokenizer = str(TOKENIZER_DIR)
    for path in ("/no/such/student", "./student", "../no/such/student", "~/no/such/student", "out/sft"):
        with pytest.raises(ValueError, match=rf"^model\.model {re.escape(path)}: no such directory \("):
            StudentModule(model=path, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"^model\.model out: the directory holds no model \(no config\.js"):
        StudentModule(model="out", tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"^model\.tokenizer \./tok: no such directory \(.+ a tokenizer's"):
        StudentModule(model_config=TINY_LLAMA, tokenizer="./tok")
    hub = StudentModule(model="HuggingFaceTB/SmolLM2-135M", tokenizer=tokenizer)  # offline: loaded at fit
    assert hub.model_name == "HuggingFaceTB/SmolLM2-135M"


def test_an_option_that_moved_is_one_line_naming_its_new_place(tmp_path, kd_teacher_dir, capfd):
    """An older config's ``data.k: 64`` (now ``data.sparsity: {k: 64}``) got the parser's 60-line usage
    and its union errors; an unknown option still gets those."""
    current = kd_config(tmp_path, kd_teacher_dir)
    config = yaml.safe_load(current.read_text())
    config["data"]["init_args"]["k"] = 64
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(old)])
    assert stop.value.code == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set to")]
    assert lines == [
        "error: data.k moved: write data.sparsity: {k: ...} (distill.teacher.sparse.Sparsity)"
    ], err
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(current), "--data.init_args.kk", "1"])
    assert stop.value.code == 2
    err = capfd.readouterr().err
    assert err.startswith("usage: ") and "Option 'kk' is not accepted" in err, err


@pytest.mark.parametrize("command", ["tokenize", "inspect", "collect"])
def test_a_bad_value_is_one_line_in_every_command(tmp_path, kd_teacher_dir, capfd, command):
    """``tokenize`` and ``inspect`` build the config as ``fit`` does: the same one line, exit 2 (they
    printed jsonargparse's 118-line traceback, exit 1)."""
    config = kd_config(tmp_path, kd_teacher_dir)
    with pytest.raises(SystemExit) as stop:
        run_command([command, "--config", str(config), "--model.init_args.objective.init_args.alpha", "1.5"])
    assert stop.value.code == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set to")]
    assert lines == [
        "error: Distillation alpha (the KD term's weight; 1 - alpha goes to cross-entropy) "
        "must be in [0, 1]; got 1.5"
    ], err


def test_a_reward_function_that_does_not_import_is_one_line(monkeypatch, capfd):
    """Our refusal raised from an ImportError: one line, not 10 KB of the parser's union attempts."""
    monkeypatch.chdir(ROOT)  # the config's relative paths
    reward = {"class_path": "distill.rewards.Function", "init_args": {"path": "no_such_module:score"}}
    args = ["fit", "--config", str(ROOT / "configs" / "grpo.yaml")]
    with pytest.raises(SystemExit) as stop:
        main([*args, "--model.init_args.objective.init_args.rewards+", json.dumps(reward)])
    assert stop.value.code == 2
    err = capfd.readouterr().err
    assert err.splitlines()[-1] == (
        "error: reward function 'no_such_module:score': cannot import 'no_such_module': "
        "No module named 'no_such_module'"
    )
    assert "Traceback" not in err and len(err.splitlines()) <= 3, err


@pytest.mark.parametrize(
    ("build", "option", "wanted"),
    [
        (CrossEntropy, {"chunk_size": -1}, "objective.chunk_size must be >= 1, got -1"),
        (CrossEntropy, {"chunk_size": 0}, "objective.chunk_size must be >= 1, got 0"),
        (Distillation, {"chunk_size": 0}, "objective.chunk_size must be >= 1, got 0"),
        (Distillation, {"temperature": 0.0}, "objective.temperature must be > 0, got 0.0"),
        (Preference, {"chunk_size": -8}, "objective.chunk_size must be >= 1, got -8"),
        (KTO, {"chunk_size": 0}, "objective.chunk_size must be >= 1, got 0"),
        (lambda **kw: GRPO([], **kw), {"chunk_size": -1}, "objective.chunk_size must be >= 1, got -1"),
        (Sampling, {"top_k": -1}, "sampling.top_k must be >= 0, got -1"),
        (lambda **kw: OnPolicyDistillation([], **kw), {"chunk_size": 0}, "objective.chunk_size must be >= 1"),
        (DataModule, {"batch_size": 0}, "data.batch_size must be >= 1, got 0"),
        (DataModule, {"val_fraction": -0.2}, "data.val_fraction must be in [0, 1), got -0.2"),
        (DataModule, {"val_fraction": 1.0}, "data.val_fraction must be in [0, 1), got 1.0"),
        (DataModule, {"max_seq_length": 1}, "data.max_seq_length must be >= 2, got 1"),
        (DataModule, {"num_proc": 0}, "data.num_proc must be >= 1, got 0"),
        (DataModule, {"max_train_samples": -5}, "data.max_train_samples must be >= 1, got -5"),
        (PreferenceDataModule, {"eval_batch_size": 0}, "data.eval_batch_size must be >= 1, got 0"),
        (PromptDataModule, {"batch_size": 0}, "data.batch_size must be >= 1, got 0"),
        (PromptDataModule, {"max_prompt_length": 0}, "data.max_prompt_length must be >= 1, got 0"),
        (lambda **kw: KDDataModule([], **kw), {"chunk_samples": 0}, "data.chunk_samples must be >= 1, got 0"),
        (
            lambda **kw: KDDataModule([], **kw),
            {"value_bits": 17},
            "data.value_bits must be in [2, 16], got 17",
        ),
        (Sparsity, {"num_draws": -1}, "sparsity.num_draws must be >= 0, got -1"),
        (Sparsity, {"draw_temperature": 0.0}, "sparsity.draw_temperature must be > 0, got 0.0"),
        (Sparsity, {"scheme": "hybrid"}, "sparsity.scheme 'hybrid' needs sparsity.num_draws > 0"),
        (
            lambda **kw: WarmupDecay(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 10, **kw),
            {"warmup_steps": -3},
            "model.scheduler.warmup_steps must be >= 0, got -3",
        ),
    ],
)
def test_an_option_that_cannot_work_is_refused_where_it_is_given(build, option, wanted):
    """A negative chunk size trained on nothing and reported success; a zero batch size ended in a bare
    ZeroDivisionError: each is refused at construction, naming the option, its value and its range."""
    with pytest.raises(ValueError, match=re.escape(wanted)):
        build(**option)
