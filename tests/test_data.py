import gzip

import numpy as np
import pytest
import torch

from nasfast.config import DataConfig
from nasfast.data.blocks import build_corpus, corpus_files, load_tokenizer
from nasfast.errors import UserError


def test_default_corpus_is_embedded():
    names = {p.name for p in corpus_files(["default"])}
    assert {"austen.txt.gz", "enwiki.txt.gz", "web_bible.txt.gz", "wordnet_glosses.txt.gz"} <= names


def test_micro_corpus_blocks_and_split(micro_corpus):
    c = micro_corpus
    assert c.train_blocks.shape[1] == 32 and c.dev_blocks.shape == (16, 32)
    assert (c.train_blocks[:, 0] == c.tokenizer.cls_token_id).all()
    assert (c.train_blocks[:, -1] == c.tokenizer.sep_token_id).all()
    assert c.vocab_size <= 400
    # dev blocks are not in train
    train = {tuple(b) for b in c.train_blocks}
    assert not any(tuple(b) in train for b in c.dev_blocks)


def test_tokenizer_saved_in_run_folder_and_reloaded(tmp_path, micro_config):
    cfg = micro_config.data
    first = build_corpus(cfg, tmp_path)
    tok = load_tokenizer(tmp_path / "data" / "tokenizer")
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    text = "it is a truth universally acknowledged"
    assert tok(text)["input_ids"] == first.tokenizer(text)["input_ids"]
    again = build_corpus(cfg, tmp_path)  # from the run folder's copy
    other = build_corpus(cfg, tmp_path / "other")  # a second run gets the same tokenizer from the cache
    assert other.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert np.array_equal(first.train_blocks, again.train_blocks)
    assert np.array_equal(first.dev_blocks, again.dev_blocks)


def test_prepared_data_pins_tokens_across_corpus_settings(tmp_path, micro_config):
    """data.prepared uses exactly a saved tokenizer + blocks (how an experiment pins its data)."""
    import dataclasses

    from nasfast.errors import UserError

    first = build_corpus(micro_config.data, tmp_path / "a")
    pinned = dataclasses.replace(micro_config.data, prepared=str(tmp_path / "a" / "data"), corpus=[str(tmp_path / "missing.txt")],
                                 vocab_size=999, cache_dir=str(tmp_path / "empty-cache"))
    again = build_corpus(pinned, tmp_path / "b")
    assert np.array_equal(first.train_blocks, again.train_blocks) and np.array_equal(first.dev_blocks, again.dev_blocks)
    assert (tmp_path / "b" / "data" / "blocks.npz").read_bytes() == (tmp_path / "a" / "data" / "blocks.npz").read_bytes()
    assert not (tmp_path / "empty-cache").exists()  # nothing was tokenized
    with pytest.raises(UserError, match="blocks of 32 tokens"):
        build_corpus(dataclasses.replace(pinned, block_size=16))
    with pytest.raises(UserError, match="has no blocks.npz"):
        build_corpus(dataclasses.replace(pinned, prepared=str(tmp_path)))


def test_masking_rate_and_labels(micro_corpus):
    torch.manual_seed(0)
    batch = micro_corpus.collate(micro_corpus.train_blocks[:64])
    selected = batch["labels"] != -100
    rate = selected.float().mean().item()
    assert 0.12 < rate < 0.18
    orig = torch.from_numpy(micro_corpus.train_blocks[:64].astype(np.int64))
    assert torch.equal(batch["labels"][selected], orig[selected])
    mask_id = micro_corpus.tokenizer.mask_token_id
    assert 0.7 < (batch["input_ids"][selected] == mask_id).float().mean() < 0.9


def test_batch_indices_deterministic_and_cover_epoch(micro_corpus):
    n = len(micro_corpus.train_blocks)
    bs = 5
    steps = (n + bs - 1) // bs
    first = np.concatenate([micro_corpus.train_batch_indices(3, s, bs) for s in range(steps)])[:n]
    assert sorted(first.tolist()) == list(range(n))  # one epoch is a permutation
    assert np.array_equal(micro_corpus.train_batch_indices(3, 7, bs), micro_corpus.train_batch_indices(3, 7, bs))
    assert not np.array_equal(micro_corpus.train_batch_indices(3, 0, bs), micro_corpus.train_batch_indices(4, 0, bs))
    ranks = [micro_corpus.train_batch_indices(3, 0, bs, rank=r, world=2) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])


def test_dev_batches_fixed(micro_corpus):
    a = micro_corpus.dev_batches(4, 2)
    torch.manual_seed(123)
    b = micro_corpus.dev_batches(4, 2)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert micro_corpus.unigram_entropy(a) > 0


def test_empty_and_missing_corpus(tmp_path):
    empty = tmp_path / "empty.txt.gz"
    with gzip.open(empty, "wt") as fh:
        fh.write("\n\n  \n")
    with pytest.raises(UserError, match="empty"):
        build_corpus(DataConfig(corpus=[str(empty)]))
    with pytest.raises(UserError, match="not found"):
        build_corpus(DataConfig(corpus=[str(tmp_path / "nope.txt")]))


def test_local_text_folder(tmp_path, micro_config):
    src = corpus_files(["default"])[0]
    with gzip.open(src, "rt") as fh:
        text = fh.read(60000)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(text)
    cfg = micro_config.data
    cfg.corpus = [str(tmp_path / "texts")]
    cfg.max_chars_per_file = None
    corpus = build_corpus(cfg)
    assert len(corpus.train_blocks) > 20
