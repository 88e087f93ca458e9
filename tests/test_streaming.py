"""Streaming text corpora: full rows, shards that cover the corpus once per pass, exact resume (also
through a real Lightning fit and across two gloo ranks), clear errors."""

from __future__ import annotations

import json
import os
import signal
import socket
from itertools import count, islice
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from distill.data.batch import TokenBatch
from distill.data.batching import Collator
from distill.data.encoding import Encoded, encode_record
from distill.data.formats import DataFormatError, Record
from distill.data.resume import trained_batches
from distill.data.streaming import Cursor, StreamingLoader, StreamingRows, require_max_steps
from tests.helpers import write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda"]
LENGTH, BATCH = 16, 2


def texts(n: int, start: int = 0) -> list[str]:
    """Documents of 3 to ~60 tokens: many shorter than a row of 16, some spanning three rows."""
    return [
        f"doc {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range((i * 7) % 23 + 1))
        for i in range(start, start + n)
    ]


def aligned_texts(tokenizer, n: int) -> list[str]:
    """Documents of exactly 4 tokens (bos and eos included): every row of 16 ends with a document."""
    pairs = (f"{a} {b}" for a in WORDS for b in WORDS)
    found = [t for t in pairs if len(encode_record(Record("", text=t), tokenizer, None).input_ids) == 4]
    assert len(found) >= n
    return found[:n]


def corpus_dir(tmp_path: Path) -> Path:
    """A JSONL file and a .txt file (blank lines, CRLF) below a directory; a .json file there is ignored."""
    data = tmp_path / "corpus"
    (data / "sub").mkdir(parents=True)
    write_jsonl(data / "a.jsonl", [{"text": t} for t in texts(24)])
    lines = texts(12, start=100)
    (data / "sub" / "b.txt").write_bytes(
        ("\r\n".join(lines[:6]) + "\n\n  \n" + "\n".join(lines[6:])).encode()
    )
    (data / "ignored.json").write_text("[]")
    return data


def corpus(stream: StreamingRows, pass_no: int) -> list[list[int]]:
    """The token ids of every document of a pass, read naively: each file whole, one call per text."""
    docs = []
    for index in stream.file_order(pass_no):
        path = stream.files[index]
        for line in path.read_text(encoding="utf-8-sig").split("\n"):
            if line.strip():
                text = line.rstrip("\r") if path.suffix == ".txt" else json.loads(line)["text"]
                docs.append(encode_record(Record(str(path), text=text), stream.tokenizer, None).input_ids)
    return docs


def reference(stream: StreamingRows, shard: int, shards: int, batches: int) -> list[dict]:
    """The first ``batches`` batches of a shard: documents dealt by index, cut into rows of pieces."""
    rows: list[list[Encoded]] = []
    row: list[Encoded] = []
    room = stream.max_length
    for pass_no in count():
        for ids in corpus(stream, pass_no)[shard::shards]:
            while ids:
                piece, ids = ids[:room], ids[room:]
                row.append(Encoded(piece, piece, "", ""))
                room -= len(piece)
                if not room:
                    rows.append(row)
                    row, room = [], stream.max_length
        if len(rows) >= batches * stream.batch_size:
            break
    size = stream.batch_size
    return [Collator(0)(rows[b * size : (b + 1) * size]) for b in range(batches)]


def same(got: list[TokenBatch], want: list[TokenBatch]) -> bool:
    assert len(got) == len(want)
    pairs = [
        (x, y)
        for a, b in zip(got, want, strict=True)
        for x, y in zip(vars(a).values(), vars(b).values(), strict=True)
    ]
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in pairs)


def loader(files, tokenizer, progress, rank=0, world_size=1, num_workers=2, seed=0) -> StreamingLoader:
    rows = StreamingRows(files, tokenizer, LENGTH, BATCH, rank, world_size, seed)
    return StreamingLoader(rows, progress, num_workers=num_workers)


def test_ranks_x_workers_cover_every_token_of_the_corpus_once_per_pass(tmp_path, tokenizer):
    """2 ranks x 2 workers: each shard's batches are exactly those of its documents (i % 4) cut into full
    rows, pass after pass, so over all shards every token of a pass comes once."""
    data = corpus_dir(tmp_path)
    seeded = StreamingRows(data, tokenizer, LENGTH, BATCH, seed=3)
    assert [p.name for p in seeded.files] == ["a.jsonl", "b.txt"] and len(corpus(seeded, 0)) == 36
    # 20 batches of a shard run into its third pass, and the passes take the files in both orders
    assert 2 * sum(map(len, corpus(seeded, 0)[0::4])) < 20 * BATCH * LENGTH
    assert {tuple(seeded.file_order(p)) for p in range(3)} == {(0, 1), (1, 0)}
    for rank in range(2):
        got = list(islice(loader(data, tokenizer, lambda: 0, rank, 2, seed=3), 40))
        assert all(b.attention_mask is None and b.sequence_index is not None for b in got)  # packed rows
        assert all(b.input_ids.shape == (BATCH, LENGTH) for b in got)  # every row full
        for local in range(2):  # the loader reads its workers in turn
            assert same(got[local::2], reference(seeded, rank * 2 + local, 4, 20)), (rank, local)


def test_stream_tokens_are_those_of_encode_record_and_labels_skip_each_piece_start(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(10)])
    ((batch, _),) = islice(StreamingRows(path, tokenizer, 64, 1), 1)
    first = encode_record(Record("", text=texts(1)[0]), tokenizer, None).input_ids
    n = len(first)
    assert batch.input_ids[0, :n].tolist() == first and first[0] == tokenizer.bos_token_id
    assert batch.position_ids[0, : n + 2].tolist() == [*range(n), 0, 1]  # restart at the next document
    assert batch.labels[0, 0] == batch.labels[0, n] == -100
    assert batch.labels[0, 1:n].tolist() == first[1:]


@pytest.mark.parametrize("aligned", [False, True], ids=["mid-document", "at-document-ends"])
def test_a_resumed_stream_yields_the_rows_of_an_uninterrupted_run(tmp_path, tokenizer, aligned):
    """Saved after k trained batches (a few more pulled: workers and Lightning fetch ahead), a new loader
    continues at batch k: inside a document or after one, past pass boundaries, and again from a resumed
    loader."""
    docs = aligned_texts(tokenizer, 12) if aligned else texts(20)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs])
    trained = [0]

    def make() -> StreamingLoader:
        return loader(path, tokenizer, lambda: trained[0], rank=1, world_size=2)

    full = list(islice(make(), 30))
    cursors = []
    for k in (0, 1, 4, 7, 12, 19):
        first = make()
        list(islice(first, k + 3))
        trained[0] = k
        state = first.state_dict()
        assert state["batches"] == k and sorted(state["cursors"]) == [2, 3]  # rank 1's shards
        cursors += [Cursor(*c) for c in state["cursors"].values()]
        resumed = make()
        resumed.load_state_dict(state)
        assert same(list(islice(resumed, 30 - k)), full[k:]), k
    if aligned:  # each cursor points after a document, nothing to skip
        assert all(c.skip == 0 for c in cursors) and any(c.offset for c in cursors)
    else:
        assert any(c.skip and c.pass_no for c in cursors) and any(c.pass_no == 0 and c.skip for c in cursors)
    assert any(c.pass_no >= 2 for c in cursors)

    trained[0] = 7
    first = make()
    list(islice(first, 9))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    list(islice(resumed, 8))
    trained[0] = 12  # 5 batches trained since the resume
    again = make()
    again.load_state_dict(resumed.state_dict())
    assert same(list(islice(again, 10)), full[12:22])


class Stopped(Exception):
    pass


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Stopped


class Recorder(L.LightningModule):
    """Records the batches it trains on; the stream and its loader are wired as a DataModule would."""

    def __init__(self, data: Path, tokenizer) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.data, self.tokenizer = data, tokenizer
        self.seen: dict[int, list[torch.Tensor]] = {}

    def train_dataloader(self) -> StreamingLoader:
        require_max_steps(self.trainer.max_steps)
        return loader(self.data, self.tokenizer, lambda: trained_batches(self.trainer))

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.global_step, []).append(batch.input_ids)
        return (self.weight * batch.input_ids.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(
    module: Recorder,
    directory: Path,
    steps: int,
    accumulate: int,
    *callbacks,
    epoch: int | None = None,
    **kwargs,
) -> None:
    """``epoch``: batches per epoch (``limit_train_batches``); None: one endless epoch."""
    checkpoint = ModelCheckpoint(directory, every_n_train_steps=1, save_last=True, save_top_k=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_train_batches=epoch,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        callbacks=[checkpoint, *callbacks],
    )
    trainer.fit(module, **kwargs)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_stopped_fit_resumes_at_the_next_row(tmp_path, tokenizer, accumulate):
    """A Lightning fit stopped after step 3 (an odd count of batches: the next comes from the second
    worker) and resumed from last.ckpt trains steps 3-5 on the batches an uninterrupted fit trained then
    (2 workers fetching ahead, the fit loop's count of trained batches)."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(12)])
    uninterrupted = Recorder(path, tokenizer)
    fit(uninterrupted, tmp_path / "reference", 6, accumulate)
    stopped = Recorder(path, tokenizer)
    with pytest.raises(Stopped):
        fit(stopped, tmp_path / "run", 6, accumulate, StopAt(3))
    resumed = Recorder(path, tokenizer)
    fit(resumed, tmp_path / "run", 6, accumulate, ckpt_path=str(tmp_path / "run" / "last.ckpt"))
    assert sorted(resumed.seen) == [3, 4, 5]
    for step, batches in resumed.seen.items():
        assert len(batches) == accumulate
        assert all(torch.equal(a, b) for a, b in zip(batches, uninterrupted.seen[step], strict=True)), step
    assert not torch.equal(resumed.seen[3][0], uninterrupted.seen[0][0])


@pytest.mark.parametrize(
    "stop", [None, 3, 4], ids=["uninterrupted", "stopped-mid-epoch", "stopped-at-epoch-end"]
)
def test_each_epoch_of_a_cut_stream_trains_the_next_rows(tmp_path, tokenizer, stop):
    """Cut into epochs of 2 batches (``limit_train_batches``), the stream goes on with the next rows at
    each epoch, as one endless epoch trains them, also when stopped and resumed in an epoch or at its
    end: every epoch began again at the stream's start (or the resume point) and trained the same rows."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(12)])
    endless = Recorder(path, tokenizer)
    fit(endless, tmp_path / "endless", 6, 1)
    cut = Recorder(path, tokenizer)
    if stop is not None:
        with pytest.raises(Stopped):
            fit(Recorder(path, tokenizer), tmp_path / "cut", 6, 1, StopAt(stop), epoch=2)
    last = tmp_path / "cut" / "last.ckpt"
    fit(cut, tmp_path / "cut", 6, 1, epoch=2, ckpt_path=str(last) if stop is not None else None)
    assert sorted(cut.seen) == list(range(stop or 0, 6))
    for step, (batch,) in cut.seen.items():
        assert torch.equal(batch, endless.seen[step][0]), step
    assert len({tuple(b[0].flatten().tolist()) for b in endless.seen.values()}) == 6  # no two alike


def _resume_on_two_ranks(rank: int, path: Path, tokenizer, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    trained = [0]

    def make() -> StreamingLoader:  # no workers: a rank's own loader is the point
        return loader(path, tokenizer, lambda: trained[0], rank, 2, num_workers=0)

    full = list(islice(make(), 10))
    first = make()
    list(islice(first, 6))
    trained[0] = 3
    state = first.state_dict()  # a collective: rank 0's state, the one a checkpoint keeps, has every shard
    assert sorted(state["cursors"]) == [0, 1]
    resumed = make()
    resumed.load_state_dict(state)
    assert same(list(islice(resumed, 7)), full[3:])
    dist.destroy_process_group()


def test_state_gathers_the_cursors_of_every_rank(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(16)])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_resume_on_two_ranks, (path, tokenizer, port), nprocs=2, start_method="fork")


def test_resuming_with_other_shards_is_a_clear_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(8)])
    state = loader(path, tokenizer, lambda: 0, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match=r"world_size 2 -> 1.*same devices, nodes, data.num_workers"):
        loader(path, tokenizer, lambda: 0).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers 2 -> 1"):
        loader(path, tokenizer, lambda: 0, 0, 2, num_workers=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"no cursor for shards \[2, 3\]"):
        loader(path, tokenizer, lambda: 0, rank=1, world_size=2).load_state_dict(state)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "unclosed', "malformed JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "a messages record, but streaming is for text"),
        ('{"text": 5}', "field 'text' must be a string"),
        ('{"title": "no text"}', "missing field 'text'"),
    ],
)
def test_a_bad_line_names_its_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"text": "one"}}\n\n{{"text": "two"}}\n{line}\n{{"text": "four"}}\n')
    with pytest.raises(DataFormatError, match=f"{path}:4: {message}"):
        list(islice(loader(path, tokenizer, lambda: 0), 4))  # raised in a worker, re-raised here


def test_txt_lines_are_documents(tmp_path, tokenizer):
    lines = texts(5)
    path = tmp_path / "plain.txt"
    path.write_bytes(b"\xef\xbb\xbf" + ("\r\n\n".join(lines) + "\n").encode())
    ((batch, _),) = islice(StreamingRows(path, tokenizer, 200, 1), 1)
    ids = [i for t in lines for i in encode_record(Record("", text=t), tokenizer, None).input_ids]
    assert len(ids) <= 200 and batch.input_ids[0, : len(ids)].tolist() == ids


def test_workers_ignore_sigterm_and_tokenize_serially(tmp_path, tokenizer, monkeypatch):
    """A worker leaves SIGTERM to the main process (``resume.leave_sigterm_to_main``) and turns the
    tokenizer's thread pool off: one that ran in the parent before the fork would hang the worker."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(3)])
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        loader(path, tokenizer, lambda: 0).worker_init_fn(0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_loader_setup_and_limits_are_explicit(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(3)])
    with pytest.raises(ValueError, match="fewer than world_size x num_workers = 4 shards"):
        list(islice(loader(path, tokenizer, lambda: 0, rank=1, world_size=2), 2))
    with pytest.raises(ValueError, match="no persistent_workers"):
        StreamingLoader(StreamingRows(path, tokenizer, 8, 1), lambda: 0, 2, persistent_workers=True)
    with pytest.raises(ValueError, match=r"set trainer\.max_steps"):
        require_max_steps(-1)
    require_max_steps(10)
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(DataFormatError, match=r"streaming reads \.jsonl and \.txt"):
        StreamingRows(tmp_path / "x.json", tokenizer, 8, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.jsonl or \.txt"):
        StreamingRows(tmp_path / "empty", tokenizer, 8, 1)
