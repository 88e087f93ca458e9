"""Shared test helpers: paths, tiny model configs, data and config writers, subprocess runs, logs.

Test modules import from here (and fixtures come from conftest.py); they never import each other.
"""

from __future__ import annotations

import atexit
import csv
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


TOKENIZER_DIR = Path(os.environ.get("DISTILL_TEST_TOKENIZER", ROOT / "distill" / "assets" / "tokenizer"))
GPT2_TOKENIZER_DIR = ROOT / "distill" / "assets" / "tokenizer_gpt2"  # a second family: byte-level BPE


CHAT_MARKERS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


LAUNCH_VARS = ("MASTER_", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "RANK", "PL_", "SLURM", "GROUP_RANK")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(i: int, turns: int = 1) -> dict:
    messages = [{"role": "system", "content": "You answer briefly."}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {i}.{t}: what is {i} plus {t}?"})
        messages.append({"role": "assistant", "content": f"It is {i + t}, since {i} plus {t} is {i + t}."})
    return {"messages": messages}


def save_tiny_teacher(path: Path, hidden_size: int = 32) -> Path:
    """A tiny random Llama teacher with the bundled tokenizer, saved to ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**TINY_LLAMA, "hidden_size": hidden_size}, vocab_size=32000)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def save_remote_code_adapter(path: Path) -> tuple[Path, Path]:
    """A LoRA adapter (``path/adapter``) whose saved ``distill_config.yaml`` asks for
    ``trust_remote_code: true``, on a tiny base (``path/base``) whose ``config.json`` maps
    ``AutoModelForCausalLM`` to its own ``modeling_marker.py``. That module writes the returned marker
    file when it is imported: the file exists once anything ran the base's code."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base, marker = save_tiny_teacher(path / "base"), path / "remote-code-ran"
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "modeling_marker.py").write_text(
        "from pathlib import Path\n\nfrom transformers import LlamaForCausalLM\n\n"
        f"Path({str(marker)!r}).write_text('ran')\n\n\nclass MarkerForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    model = AutoModelForCausalLM.from_pretrained(base)  # the built-in Llama: nothing of base's runs
    adapter = path / "adapter"
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(adapter)
    saved = {"model": {"init_args": {"model": str(base), "model_kwargs": {"trust_remote_code": True}}}}
    (adapter / "distill_config.yaml").write_text(yaml.safe_dump(saved))
    assert not marker.exists()
    return adapter, marker


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A one-layer fp32 llama with a byte-level BPE tokenizer (the 256 byte symbols, one merge and an
    end-of-text control token) and a chat template; returns the tensors written."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, ffn = 16, 32
    tokens = [*bytes_to_unicode().values(), "he", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
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
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    shapes["output.weight"] = (len(tokens), hidden)
    for name, shape in [
        ("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
        ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)), ("attn_output", (hidden, hidden)),
        ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn)),
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


def write_config(tmp_path: Path, chat_file: Path, **data) -> Path:
    config = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 50,
            "log_every_n_steps": 1,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs")},
            },
            "callbacks": [
                {"class_path": "distill.callbacks.HFExport", "init_args": {"dirpath": str(tmp_path / "hf")}}
            ],
        },
        "model": {
            "class_path": "distill.StudentModule",
            "init_args": {
                "tokenizer": str(TOKENIZER_DIR),
                "model_config": TINY_LLAMA,
                "optimizer": {"class_path": "distill.train.optim.AdamW", "init_args": {"lr": 0.01}},
            },
        },
        "data": {
            "class_path": "distill.DataModule",
            "init_args": {
                "train_files": str(chat_file),
                "val_fraction": 0.2,
                "template": "mistral",
                "batch_size": 4,
                **data,
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kd_config(tmp_path: Path, teacher: Path, n: int = 24, **data_extra) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", [conversation(i, turns=1 + i % 3) for i in range(n)])
    val = write_jsonl(tmp_path / "val.jsonl", [conversation(100 + i) for i in range(6)])
    config = {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "log_every_n_steps": 1,
            "val_check_interval": 3,
            "check_val_every_n_epoch": None,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path)},
            },
        },
        "model": {
            "class_path": "distill.StudentModule",
            "init_args": {
                "tokenizer": str(TOKENIZER_DIR),
                "model_config": TINY_LLAMA,
                "objective": {"class_path": "distill.objectives.Distillation", "init_args": {"alpha": 0.5}},
            },
        },
        "data": {
            "class_path": "distill.KDDataModule",
            "init_args": {
                "train_files": str(train),
                "val_files": str(val),
                "template": "mistral",
                "max_seq_length": 96,
                "batch_size": 4,
                "teachers": [{"model": str(teacher), "name": "t1"}],
                "sparsity": {"k": 8},
                "cache_dir": str(tmp_path / "cache"),
                "chunk_samples": 8,
                **data_extra,
            },
        },
    }
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def collect_config(tmp_path: Path, data: Path, teacher: Path, **extra) -> Path:
    config = {
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "distill.TeacherModule",
            "init_args": {
                "tokenizer": str(TOKENIZER_DIR),
                "teachers": [{"model": str(teacher), "name": "t1"}],
                "sparsity": {"k": 8},
                **extra.pop("model", {}),
            },
        },
        "data": {
            "class_path": "distill.DataModule",
            "init_args": {
                "train_files": str(data),
                "val_fraction": 0.25,
                "template": "mistral",
                "batch_size": 4,
            },
        },
    }
    config["trainer"]["callbacks"] = [
        {
            "class_path": "distill.callbacks.TeacherCacheWriter",
            "init_args": {
                "path": str(tmp_path / "cache" / "train"),
                "val_path": str(tmp_path / "cache" / "val"),
                **extra.pop("writer", {}),
            },
        }
    ]
    path = tmp_path / "collect.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dataset_samples(config: Path):
    from distill.cli import run_cli

    cli = run_cli(["--config", str(config)], run=False)
    cli.datamodule.setup("predict")
    return cli.datamodule


def logged_rows(tmp_path: Path) -> list[dict]:
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    return list(csv.DictReader(metrics.open()))


def logged_values(tmp_path: Path, name: str) -> list[float]:
    """Every value logged under ``name`` in the run's CSV metrics."""
    (path,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    return [float(row[name]) for row in csv.DictReader(path.open()) if row.get(name)]


def losses_named(directory: Path, name: str) -> dict[int, float]:
    out = {}
    for path in directory.rglob("metrics.csv"):
        for row in csv.DictReader(path.open()):
            if row.get(name):
                out[int(row["step"])] = float(row[name])
    return out


def losses(directory: Path) -> dict[int, float]:
    """train/loss by step from the run's CSV log."""
    return losses_named(directory, "train/loss")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARS)}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, **extra}


def run(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """``python -m distill ARGS`` run to its end (``start``), with its exit status and output."""
    with tempfile.TemporaryDirectory() as logs:
        out, err = Path(logs) / "stdout", Path(logs) / "stderr"
        process = start(args, env, out, err)
        process.join(timeout=600)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["distill", *args], 600, out.read_text(), err.read_text())
        output = [path.read_text(errors="replace") for path in (out, err)]
        result = subprocess.CompletedProcess(["distill", *args], process.exitcode, *output)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def start(args: list[str], env: dict[str, str], stdout: Path | str, stderr: Path | str) -> BaseProcess:
    """``python -m distill ARGS`` started in its own process, forked from a server that has imported
    distill once: the same fresh process, without the ~6 s of imports each launch would pay. The fit runs
    under ``runpy`` as ``python -m distill`` does, so Lightning launches further ranks the same way."""
    process = _FORKS.Process(target=_distill_main, args=(args, env, str(stdout), str(stderr)))
    process.start()
    return process


_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["distill.cli", "tests.helpers", "tests.probes"])


def start_script(source: str, args: list[str], env: dict[str, str], stderr: Path | str) -> BaseProcess:
    """``python -c SOURCE ARGS`` started as ``start`` starts a fit: forked from the server, so a script
    that imports distill's modules does not pay their seconds of imports."""
    process = _FORKS.Process(target=_script_main, args=(source, args, env, str(stderr)))
    process.start()
    return process


def _distill_main(args: list[str], env: dict[str, str], stdout: str, stderr: str) -> None:
    """The body of a forked ``python -m distill``: its environment, output files, and exit."""
    _as_process(
        ["distill", *args],
        env,
        stdout,
        stderr,
        lambda: runpy.run_module("distill", run_name="__main__", alter_sys=True),
    )


def _script_main(source: str, args: list[str], env: dict[str, str], stderr: str) -> None:
    """The body of a forked ``python -c SOURCE ARGS``."""
    _as_process(
        ["-c", *args],
        env,
        os.devnull,
        stderr,
        lambda: exec(compile(source, "<string>", "exec"), {"__name__": "__main__"}),
    )


def _as_process(
    argv: list[str], env: dict[str, str], stdout: str, stderr: str, body: Callable[[], object]
) -> None:
    """Run ``body`` as a fresh process would: its environment, argv, output files, and exit status."""
    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdin = open(os.devnull)  # noqa: SIM115 -- the process's stdin until it exits
    sys.argv = argv
    multiprocessing.set_start_method(None, force=True)  # the server's method is not the fit's default
    code = 0
    try:
        body()
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:  # a message, which an interpreter prints before exiting 1
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what an interpreter does at exit (multiprocessing ends with os._exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def with_last_checkpoint(config: dict, directory: Path) -> Path:
    """The run config with a checkpoint every step in a fixed dirpath (how a new process finds
    ``--ckpt_path last``), written to ``directory/run.yaml``."""
    checkpoint = {"every_n_train_steps": 1, "save_last": True, "save_top_k": 0}
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {**checkpoint, "dirpath": str(directory / "checkpoints")},
        }
    ]
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_killed_fit_resumes(tmp_path: Path, config_in: Callable[[str], Path], steps: list[str]) -> None:
    """A fit SIGKILLed at step 6 and resumed with ``--ckpt_path last`` logs steps 6-9 with the losses of
    an uninterrupted run of 10 steps."""
    kill = {"class_path": "tests.probes.KillAt", "init_args": {"step": 6}}
    check_stopped_fit_resumes(tmp_path, config_in, steps, kill, returncode=-9)


def check_stopped_fit_resumes(
    tmp_path: Path, config_in: Callable[[str], Path], steps: list[str], probe: dict, returncode: int
) -> subprocess.CompletedProcess:
    """A fit stopped by the callback ``probe`` (a kill or a signal) with exit status ``returncode``, its
    last checkpoint at step 6, and resumed with ``--ckpt_path last``, logs steps 6-9 with the losses of an
    uninterrupted run of 10 steps. Returns the stopped run."""
    run(["fit", "--config", str(config_in("reference")), *steps], clean_env())
    resumed = config_in("resumed")
    stopped = run(
        ["fit", "--config", str(resumed), *steps, "--trainer.callbacks+", json.dumps(probe)],
        clean_env(),
        check=False,
    )
    assert stopped.returncode == returncode, stopped.stderr[-3000:]
    run(["fit", "--config", str(resumed), *steps, "--ckpt_path", "last"], clean_env())
    want = losses(tmp_path / "reference")
    assert sorted(want) == list(range(10))
    # the resumed process logged from step 6 on: it started from the checkpoint, not from scratch
    (resumed_log,) = (tmp_path / "resumed").rglob("version_1")
    got = losses(resumed_log)
    assert sorted(got) == list(range(6, 10))
    assert all(abs(want[s] - got[s]) < 1e-5 for s in got), {s: (want[s], got[s]) for s in got}
    return stopped


def token_inputs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, targets):
    """``LossInputs`` of loss positions that all belong to one sequence (objectives of token units), of a
    batch (one row: the labels) carrying the teachers' ``targets`` (``BatchTargets``)."""
    from distill.data.batch import TokenBatch
    from distill.objectives.base import LossInputs

    sequence = torch.zeros(labels.shape[0], dtype=torch.long)
    row = torch.cat([labels[:1], labels])[None]  # position t is trained on label t + 1
    positions = torch.arange(row.shape[1])[None]
    batch = TokenBatch(input_ids=row, labels=row, position_ids=positions, targets=targets)
    return LossInputs(hidden, labels, sequence, hidden[-1:].detach(), head, batch)


def objective_loss(objective, model: torch.nn.Module, batch):
    """``objective`` on a batch of rows through a causal LM's backbone and head, as the student runs it."""
    from distill.objectives.base import loss_inputs

    hidden = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).last_hidden_state
    return objective(loss_inputs(hidden, model.get_output_embeddings(), batch))


def preference_pair(i: int) -> dict:
    """A MedicalGPT-style pair: a right answer chosen, a wrong one rejected."""
    return {
        "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"}],
        "chosen": f"It is {2 * i}.",
        "rejected": f"It is {2 * i + 1}, I think, or maybe not.",
    }


def preference_config(tmp_path: Path, model_dir: Path, objective: dict, n: int = 16, **data) -> Path:
    """A fit config of ``objective`` on ``n`` tiny pairs (and 4 held out), policy from ``model_dir``."""
    train = write_jsonl(tmp_path / "pairs.jsonl", [preference_pair(i) for i in range(n)])
    val = write_jsonl(tmp_path / "pairs_val.jsonl", [preference_pair(100 + i) for i in range(4)])
    config = yaml.safe_load(write_config(tmp_path, train).read_text())
    config["model"]["init_args"] = {
        "model": str(model_dir),
        "objective": objective,
        "optimizer": {"class_path": "distill.train.optim.AdamW", "init_args": {"lr": 0.003}},
    }
    config["data"] = {
        "class_path": "distill.PreferenceDataModule",
        "init_args": {
            "train_files": str(train),
            "val_files": str(val),
            "template": "mistral",
            "batch_size": 4,
            "max_seq_length": 64,
            **data,
        },
    }
    config["trainer"]["max_steps"] = 4
    config["trainer"]["val_check_interval"] = 4
    config["trainer"]["check_val_every_n_epoch"] = None
    path = tmp_path / "preference.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def objective_context(tokenizer, model: torch.nn.Module, data=None, **options):
    """A one-process ``Context`` for an objective under test: ``model`` is the policy; ``data`` the
    ``DataFacts`` (default: token samples padded with the tokenizer's pad id)."""
    from distill.data.batching import pad_token_id
    from distill.data.facts import DataFacts
    from distill.objectives.context import Context, Policy

    data = data or DataFacts("a test", "samples", pad_token_id(tokenizer))
    return Context(tokenizer, data, Policy(model, has_adapter=hasattr(model, "disable_adapter")), **options)
