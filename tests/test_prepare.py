"""Prepared data: streaming prepare == the in-memory path, input formats, existing tokenizers, atomic
prepare under SIGKILL, run folders that reference data by hash, overlapped loading, 2 ranks."""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import signal
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import MICRO_OVERRIDES
from runhelpers import assert_one_line, cli

from nasfast.config import DataConfig, load_config, save_config
from nasfast.data.blocks import (
    DEV_SPLIT_SEED,
    Corpus,
    build_corpus,
    corpus_files,
    make_blocks,
    mask_tokens,
    read_lines,
    torch_generator,
)
from nasfast.data.loader import StepLoader
from nasfast.data.prepare import open_prepared, prepare, read_manifest
from nasfast.distributed import World
from nasfast.errors import UserError


def _micro_text(chars: int = 120_000, start: int = 0) -> list[str]:
    with gzip.open(corpus_files(["default"])[1], "rt") as fh:
        text = fh.read(start + chars)[start:]
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory):
    """A small BERT WordPiece tokenizer folder made here from the embedded corpus (no download)."""
    from nasfast.data.prepare import train_tokenizer

    folder = tmp_path_factory.mktemp("wordpiece")
    train_tokenizer(_micro_text(200_000), 300, True).save_pretrained(str(folder))
    return folder


def _data_cfg(micro_config, **changes) -> DataConfig:
    return dataclasses.replace(micro_config.data, **changes)


def test_prepared_blocks_and_batches_equal_the_in_memory_path(micro_config, tmp_path):
    cfg = micro_config.data
    stats = prepare(cfg, tmp_path / "prep")
    manifest, tokenizer, train, dev, counts = open_prepared(tmp_path / "prep")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and manifest["hash"] == stats.hash
    # the in-memory path with the same tokenizer: read every line, make blocks, split with the same seed
    blocks = make_blocks(read_lines(corpus_files(cfg.corpus), cfg.max_chars_per_file), tokenizer, cfg.block_size)
    perm = np.random.default_rng(DEV_SPLIT_SEED).permutation(len(blocks))
    assert np.array_equal(dev, blocks[perm[: cfg.dev_blocks]])
    memory = blocks[np.sort(perm[cfg.dev_blocks :])]
    assert np.array_equal(train, memory)
    assert np.array_equal(counts, np.bincount(memory.ravel(), minlength=len(tokenizer)))
    mapped, in_memory = Corpus(tokenizer, train, dev, 0.15, counts=counts), Corpus(tokenizer, memory, dev, 0.15)
    for step in (0, 3, 40):
        for rank in range(2):
            world = World(rank=rank, size=2)
            a, b = mapped.train_batch(7, step, 0, 1, 4, world), in_memory.train_batch(7, step, 0, 1, 4, world)
            assert a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    dev_batches = mapped.dev_batches(4, 2)
    assert mapped.unigram_entropy(dev_batches) == in_memory.unigram_entropy(dev_batches)


def _write_inputs(folder, lines, column="body"):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    half = len(lines) // 2
    (folder / "all.txt").write_text("\n".join(lines) + "\n")
    with gzip.open(folder / "all.jsonl.gz", "wt") as fh:
        for line in lines:
            fh.write(json.dumps({column: line, "id": 1}) + "\n")
    pq.write_table(pa.table({column: lines[:half]}), folder / "first.parquet", row_group_size=500)
    with open(folder / "second.jsonl", "w") as fh:
        fh.writelines(json.dumps({column: line}) + "\n" for line in lines[half:])
    datasets.Dataset.from_dict({column: lines}).save_to_disk(str(folder / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({column: lines})}).save_to_disk(str(folder / "saved_dict"))


def test_jsonl_parquet_saved_dataset_and_mixed_inputs_give_the_txt_blocks(micro_config, tmp_path, wordpiece_dir):
    lines = _micro_text()
    _write_inputs(tmp_path / "in", lines)
    base = _data_cfg(micro_config, tokenizer=str(wordpiece_dir), text_column="body", max_chars_per_file=None, dev_blocks=8)
    reference = None
    for name, corpus in [("txt", ["all.txt"]), ("jsonl", ["all.jsonl.gz"]), ("saved", ["saved"]), ("dict", ["saved_dict"]),
                         ("mixed", ["first.parquet", "second.jsonl"])]:
        cfg = dataclasses.replace(base, corpus=[str(tmp_path / "in" / c) for c in corpus])
        prepare(cfg, tmp_path / name)
        _, tokenizer, train, dev, _ = open_prepared(tmp_path / name)
        rows = np.concatenate([train, dev])
        if reference is None:
            reference = rows
            assert tokenizer.get_vocab() == load_tokenizer_vocab(wordpiece_dir)
            first = tokenizer(lines[0], add_special_tokens=False)["input_ids"]
            assert train[0, 1 : 1 + min(len(first), 30)].tolist() == first[:30]  # the given tokenizer's own ids
        elif name == "mixed":  # two sources, each starting a new chunk: the same text, within a chunk's remainder
            assert abs(len(rows) - len(reference)) <= 1
        else:
            assert np.array_equal(rows, reference), name
    with pytest.raises(UserError, match="no field 'text'"):
        prepare(dataclasses.replace(base, corpus=[str(tmp_path / "in" / "all.jsonl.gz")], text_column="text"), tmp_path / "bad")
    with pytest.raises(UserError, match="no column 'text'"):
        prepare(dataclasses.replace(base, corpus=[str(tmp_path / "in" / "first.parquet")], text_column="text"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def load_tokenizer_vocab(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def test_existing_tokenizer_folder_and_bad_ones(micro_config, tmp_path, wordpiece_dir):
    from transformers import BertTokenizerFast

    # a plain BERT vocab.txt folder (what bert-base-uncased ships) works too
    vocab = sorted(load_tokenizer_vocab(wordpiece_dir).items(), key=lambda kv: kv[1])
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("".join(f"{tok}\n" for tok, _ in vocab))
    BertTokenizerFast(str(tmp_path / "bert" / "vocab.txt")).save_pretrained(str(tmp_path / "bert"))
    cfg = _data_cfg(micro_config, tokenizer=str(tmp_path / "bert"))
    corpus = build_corpus(cfg, tmp_path / "run")
    assert corpus.tokenizer.get_vocab() == dict(vocab)
    assert corpus.vocab_size == len(vocab) != cfg.vocab_size  # the tokenizer's own size, not data.vocab_size
    with pytest.raises(UserError, match="not a folder"):
        prepare(_data_cfg(micro_config, tokenizer=str(tmp_path / "missing")), tmp_path / "p")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        prepare(_data_cfg(micro_config, tokenizer=str(tmp_path / "junk")), tmp_path / "p")


def test_tokenizer_sample_bounds_the_text_it_is_trained_on(micro_config, tmp_path):
    from nasfast.data.prepare import tokenizer_sample
    from nasfast.data.sources import resolve_sources

    cfg = _data_cfg(micro_config, tokenizer_sample_chars=20_000, max_chars_per_file=None)
    sources = resolve_sources(cfg.corpus)
    units = list(tokenizer_sample(sources, cfg))
    longest = max(len(u) for u in units)
    assert 20_000 <= sum(len(u) for u in units) <= 20_000 + len(sources) * longest  # each source stops at its share
    assert {u for u in units} & set(_micro_text(3000))  # every source contributes (here: the second file's start)


# --- atomic prepare under SIGKILL; the CLI ------------------------------------------------------
@pytest.fixture
def micro_yaml_tok(tmp_path, micro_config, wordpiece_dir):
    cfg = load_config(None, MICRO_OVERRIDES + [f"data.tokenizer={wordpiece_dir}"])
    path = tmp_path / "micro.yaml"
    save_config(cfg, path)
    return path


@pytest.mark.slow
def test_sigkilled_prepare_leaves_nothing_and_a_rerun_completes(tmp_path, micro_yaml_tok):
    out = tmp_path / "prep"
    for point in ("prepare:train-slice", "prepare:before-rename"):  # while writing; with every file written
        killed = cli("prepare-data", "--config", micro_yaml_tok, "--out", out, "--no-progress", env={"NASFAST_KILL_AT": point})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert not out.exists() and len(list(tmp_path.glob(".prep.tmp-*"))) == 1  # only the killed one's temp folder
    done = cli("prepare-data", "--config", micro_yaml_tok, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "prepared" in done.stdout and f"data.prepared={out}" in done.stdout
    assert not list(tmp_path.glob(".prep.tmp-*"))  # the leftover was cleared
    clean = prepare(load_config(micro_yaml_tok).data, tmp_path / "clean")
    assert read_manifest(out)["hash"] == clean.hash  # the same tokenizer gives the same data, bit for bit


@pytest.mark.slow
def test_cli_prepare_data_errors_and_noop(tmp_path, micro_yaml_tok):
    out = tmp_path / "prep"
    assert cli("prepare-data", "--config", micro_yaml_tok, "--out", out, "--num-proc", "2", "--no-progress").returncode == 0
    mtime = (out / "train.npy").stat().st_mtime_ns
    again = cli("prepare-data", "--config", micro_yaml_tok, "--out", out, "--no-progress")
    assert again.returncode == 0 and (out / "train.npy").stat().st_mtime_ns == mtime  # already there: nothing redone
    one = prepare(load_config(micro_yaml_tok).data, tmp_path / "one")
    assert read_manifest(out)["hash"] == one.hash  # 2 processes == 1 process
    other = cli("prepare-data", "--config", micro_yaml_tok, "--out", out, "--set", "data.dev_blocks=20", "--no-progress")
    assert other.returncode == 2
    assert_one_line(other.stderr, "already holds other prepared data")
    bad = cli("prepare-data", "--config", micro_yaml_tok, "--out", tmp_path / "x", "--num-proc", "0")
    assert bad.returncode == 2
    assert_one_line(bad.stderr, "--num-proc must be >= 1")
    (tmp_path / "mine").mkdir()
    foreign = cli("prepare-data", "--config", micro_yaml_tok, "--out", tmp_path / "mine")
    assert foreign.returncode == 2
    assert_one_line(foreign.stderr, "not a prepared-data folder")


# --- run folders reference large data by hash -----------------------------------------------------
@pytest.mark.slow
def test_run_references_prepared_data_and_resume_refuses_another_hash(tmp_path, micro_yaml_tok):
    prep, run = tmp_path / "prep", tmp_path / "run"
    assert cli("prepare-data", "--config", micro_yaml_tok, "--out", prep, "--no-progress").returncode == 0
    sets = ["--set", f"data.prepared={prep}", "--set", "data.copy_max_mb=0"]
    first = cli("pretrain", "--config", micro_yaml_tok, "--out", run, *sets, "--stop-after", "2", "--no-progress")
    assert first.returncode == 0, first.stderr
    assert not (run / "data" / "blocks.npz").exists() and (run / "data" / "tokenizer").is_dir()
    ref = json.loads((run / "data" / "prepared.json").read_text())
    assert ref == {"path": str(prep.resolve()), "hash": read_manifest(prep)["hash"]}
    # the same data, moved: resume follows data.prepared as long as the hash matches
    prep.rename(tmp_path / "moved")
    moved = cli("pretrain", "--out", run, "--resume", "--set", f"data.prepared={tmp_path / 'moved'}", "--stop-after", "1", "--no-progress")
    assert moved.returncode == 0, moved.stderr
    # other data under the recorded path: refused, exit 2, one line
    assert cli("prepare-data", "--config", micro_yaml_tok, "--out", prep, "--set", "data.max_chars_per_file=30000",
               "--no-progress").returncode == 0
    refused = cli("pretrain", "--out", run, "--resume", "--set", f"data.prepared={prep}", "--no-progress")
    assert refused.returncode == 2
    assert_one_line(refused.stderr, "not the data this run trained on")
    (tmp_path / "archs.txt").write_text("mha:2|ffn:40|conv:3\n")
    assert cli("evaluate", "--run", run, "--archs", tmp_path / "archs.txt", "--no-progress").returncode == 0
    shutil.rmtree(tmp_path / "moved")
    prep.rename(tmp_path / "moved")  # other data where the run's config says its data are
    evaluate = cli("evaluate", "--run", run, "--archs", tmp_path / "archs.txt", "--no-progress")
    assert evaluate.returncode == 2
    assert_one_line(evaluate.stderr, "not the data this run trained on")
    shutil.rmtree(tmp_path / "moved")
    gone = cli("evaluate", "--run", run, "--archs", tmp_path / "archs.txt", "--no-progress")
    assert gone.returncode == 2
    assert_one_line(gone.stderr, "are gone")


# --- masking, overlapped loading -------------------------------------------------------------------
def test_vectorised_masking_is_the_collators_and_deterministic(micro_corpus):
    from transformers import DataCollatorForLanguageModeling

    c = micro_corpus
    blocks = c.train_blocks[:64]
    collator = DataCollatorForLanguageModeling(c.tokenizer, mlm=True, mlm_probability=c.mlm_probability)
    for seed in (0, 11, 2**31 + 5):
        collator.generator = torch_generator(seed)  # the collator draws from .generator (None: the global RNG)
        expected = collator([{"input_ids": b} for b in torch.from_numpy(blocks.astype(np.int64))])
        got = c.collate(blocks, torch_generator(seed))
        assert torch.equal(got["input_ids"], expected["input_ids"]) and torch.equal(got["labels"], expected["labels"])
        assert torch.equal(c.collate(blocks, torch_generator(seed))["labels"], got["labels"])  # deterministic
    # 80/10/10 over many draws (a random block of random ids, no special tokens but CLS/SEP)
    ids = torch.randint(5, c.vocab_size, (512, 64), generator=torch_generator(3))
    special = torch.tensor(sorted(c.tokenizer.all_special_ids))
    inputs, labels = mask_tokens(ids, torch_generator(4), 0.15, c.vocab_size, c.tokenizer.mask_token_id, special)
    selected = labels != -100
    assert abs(selected.float().mean().item() - 0.15) < 0.005
    share_mask = (inputs[selected] == c.tokenizer.mask_token_id).float().mean().item()
    share_same = (inputs[selected] == ids[selected]).float().mean().item()
    assert abs(share_mask - 0.8) < 0.01 and abs(share_same - 0.1 - 0.1 / c.vocab_size) < 0.01
    assert torch.equal(inputs[~selected], ids[~selected])


def test_step_loader_prefetch_is_a_pure_function_of_the_step(micro_corpus, micro_config):
    t = dataclasses.replace(micro_config.train, grad_accum=2, steps=50)
    direct = StepLoader(micro_corpus, t, torch.device("cpu"), prefetch=False)
    with StepLoader(micro_corpus, t, torch.device("cpu"), prefetch=True) as loader:
        for step in [0, 1, 2, 9, 3, 4, 4, 49]:  # in order (prefetched), jumps (a resume), repeats, the last step
            got, want = loader.get(step), direct.build(step)
            assert [s for s, _ in got] == [s for s, _ in want]
            assert all(torch.equal(g[k], w[k]) for (_, g), (_, w) in zip(got, want) for k in w)


def test_prefetching_run_equals_a_synchronous_one(micro_config, tmp_path):
    from nasfast.training.trainer import Trainer

    losses = {}
    for prefetch in (True, False):
        cfg = load_config(None, MICRO_OVERRIDES + [f"data.prefetch={prefetch}", "train.steps=4"])
        summary = Trainer(cfg, tmp_path / str(prefetch), progress=False).train()
        lines = (tmp_path / str(prefetch) / "metrics.jsonl").read_text().splitlines()
        losses[prefetch] = [json.loads(l).get("loss") for l in lines]
        assert 0 <= summary["data_wait_share"] < 1
    assert losses[True] == losses[False]


# --- two ranks read disjoint blocks from one shared map ----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, run_dir: str, out_dir: str, prep: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from nasfast.training.trainer import Trainer

    cfg = load_config(None, MICRO_OVERRIDES + [f"data.prepared={prep}", "data.copy_max_mb=0", "train.steps=4"])
    trainer = Trainer(cfg, run_dir, progress=False)
    seen, get = [], trainer.loader.get

    def recording_get(step):
        batches = get(step)
        for _, b in batches:  # the original tokens: labels where masked, inputs elsewhere
            seen.append(torch.where(b["labels"] != -100, b["labels"], b["input_ids"]).numpy().copy())
        return batches

    trainer.loader.get = recording_get
    trainer.train()
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.stack(seen))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"memmap": isinstance(trainer.corpus.train_blocks, np.memmap),
                   "file": str(getattr(trainer.corpus.train_blocks, "filename", ""))}, fh)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_read_disjoint_blocks_of_one_shared_map(micro_config, tmp_path):
    prep = tmp_path / "prep"
    prepare(micro_config.data, prep)
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path / "run"), str(tmp_path), str(prep)), nprocs=2, join=True)
    seen = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(i["memmap"] for i in info) and info[0]["file"] == info[1]["file"] == str((prep / "train.npy").resolve())
    train = np.load(prep / "train.npy", mmap_mode="r")
    rows = {bytes(r.astype(train.dtype)): i for i, r in enumerate(train)}
    index = [[rows[bytes(block.astype(train.dtype))] for step in s for block in step] for s in seen]
    assert len(index[0]) == len(index[1]) == 4 * 4  # every block is a train row
    assert not set(index[0]) & set(index[1])  # the ranks never read the same block
    corpus = Corpus(None, train, train[:1], 0.15)
    expect = [np.concatenate([corpus.train_batch_indices(0, s, 4, r, 2) for s in range(4)]).tolist() for r in range(2)]
    assert index == expect


def test_an_older_cache_entry_is_converted_keeping_its_tokenizer(micro_config, micro_corpus, tmp_path):
    """A cache written by an older nasfast (blocks.npz + tokenizer/) becomes a prepared folder with the same tokens."""
    from nasfast.data.prepare import data_key
    from nasfast.data.sources import resolve_sources

    cfg = _data_cfg(micro_config, cache_dir=str(tmp_path / "cache"))
    legacy = tmp_path / "cache" / "corpus" / data_key(cfg, resolve_sources(cfg.corpus))
    micro_corpus.tokenizer.save_pretrained(str(legacy / "tokenizer"))
    train = micro_corpus.train_blocks.astype(np.int32)[::-1]  # int32, as older versions stored them; an order no prepare makes
    dev = micro_corpus.dev_blocks.astype(np.int32)
    np.savez(legacy / "blocks.npz", train=train, dev=dev)
    corpus = build_corpus(cfg)
    assert isinstance(corpus.train_blocks, np.memmap) and np.array_equal(corpus.train_blocks, train)
    assert np.array_equal(corpus.dev_blocks, dev) and corpus.tokenizer.get_vocab() == micro_corpus.tokenizer.get_vocab()
    assert np.array_equal(corpus.counts, np.bincount(train.ravel(), minlength=corpus.vocab_size))
