"""Pretraining data, fully offline: text -> local WordPiece tokenizer -> fixed-length blocks -> batches.

- Inputs (``data.corpus``): ``default`` is the embedded corpus (``nasfast/corpus``, see its SOURCES.md),
  or local ``.txt``/``.txt.gz``, ``.jsonl``/``.jsonl.gz``, ``.parquet`` files, saved ``datasets`` folders,
  or folders of them (``nasfast.data.sources``).
- Prepared data (``nasfast.data.prepare``): tokenized once, streaming, into memory-mapped token blocks with
  the tokenizer, the fixed dev split and a manifest with a content hash. ``data.prepared`` points at such
  a folder (``nasfast prepare-data``); otherwise the data are prepared into the cache on first use.
- Run folders: ``data/`` keeps the tokenizer and, for small data, a copy of the blocks (``blocks.npz``),
  so such a run never depends on the cache; larger data are referenced by path and content hash
  (``prepared.json``), and a resume or evaluation refuses data whose hash differs.
- Batches: the training batch of step s is a pure function of (seed, s, micro, rank): resume needs no
  iterator state, and a background thread may build step s+1's batch while step s computes.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from nasfast.config import DataConfig
from nasfast.data.prepare import (  # noqa: F401 (old names, as above)
    DEV_SPLIT_SEED,
    SPECIAL_TOKENS,
    convert_legacy,
    data_key,
    load_tokenizer,
    open_prepared,
    prepare,
    read_manifest,
    token_dtype,
    train_tokenizer,
)

# Names of the old nasfast.data module, still imported from here for one release (nasfast.data forwards them):
from nasfast.data.sources import MAX_UNDECODABLE_SHARE, corpus_files, read_lines, resolve_sources  # noqa: F401
from nasfast.distributed import World
from nasfast.errors import UserError
from nasfast.files import writing
from nasfast.rng import ANCHOR_MASK_SEED, DEV_MASK_SEED, micro_seed, torch_generator

# The MLM collator's split of selected tokens: 80% [MASK], 10% a random token, 10% unchanged.
MASK_REPLACE_PROB, RANDOM_REPLACE_PROB = 0.8, 0.1
REFERENCE = "prepared.json"  # in a run's data/: the prepared data it uses, by path and content hash


def make_blocks(lines: list[str], tokenizer, block_size: int) -> np.ndarray:
    """The in-memory reference path: [CLS] + body + [SEP] blocks of a list of text units in chunks of 2000
    (run_mlm's group_texts), tokenized through transformers' own call. Preparing must give the same blocks."""
    from nasfast.data.prepare import CHUNK_UNITS, group_blocks

    dtype = token_dtype(len(tokenizer))
    parts = [group_blocks(tokenizer(lines[i : i + CHUNK_UNITS], add_special_tokens=False)["input_ids"], tokenizer.cls_token_id,
                          tokenizer.sep_token_id, block_size, dtype) for i in range(0, len(lines), CHUNK_UNITS)]
    blocks = np.concatenate(parts) if parts else np.empty((0, block_size), dtype)
    if len(blocks) == 0:
        raise UserError(f"the corpus is too small for one block of {block_size} tokens")
    return blocks


def mask_tokens(ids: torch.Tensor, generator: Optional[torch.Generator], mlm_probability: float, vocab_size: int,
                mask_id: int, special_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' DataCollatorForLanguageModeling masking, vectorised, drawing from ``generator``.

    Same draws in the same order as the collator (bernoulli select, bernoulli [MASK], bernoulli random,
    randint), so with the same generator state the masks are bitwise the collator's; special tokens are
    never selected. ``generator=None`` draws from torch's global generator, as the collator does.
    """
    inputs, labels = ids.clone(), ids.clone()
    probability = torch.full(labels.shape, mlm_probability)
    probability.masked_fill_(torch.isin(ids, special_ids), 0.0)
    selected = torch.bernoulli(probability, generator=generator).bool()
    labels[~selected] = -100
    replaced = torch.bernoulli(torch.full(labels.shape, MASK_REPLACE_PROB), generator=generator).bool() & selected
    inputs[replaced] = mask_id
    scaled = RANDOM_REPLACE_PROB / (1 - MASK_REPLACE_PROB)
    randomized = torch.bernoulli(torch.full(labels.shape, scaled), generator=generator).bool() & selected & ~replaced
    words = torch.randint(vocab_size, labels.shape, dtype=torch.long, generator=generator)
    inputs[randomized] = words[randomized]
    return inputs, labels


@dataclass
class Corpus:
    """Tokenized blocks split into train and dev, plus what masking needs.

    ``train_blocks`` may be a read-only memory map (prepared data): batches are sliced from it, so
    every rank shares the same pages and memory does not grow with the corpus.
    """

    tokenizer: object
    train_blocks: np.ndarray  # [N, block_size] uint16/uint32 (int32 in older copies)
    dev_blocks: np.ndarray  # evaluation dev split (estimates, ground truth, dev curves)
    mlm_probability: float
    anchor_blocks: Optional[np.ndarray] = None  # MAGIC-A anchor-selection split, disjoint from dev_blocks
    counts: Optional[np.ndarray] = None  # unigram counts of train_blocks (prepared data carry them)
    source: Optional[dict] = None  # {"path", "hash"} of the prepared data behind the blocks
    _perms: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fd: Optional[int] = field(default=None, repr=False)  # the train file, for pread (see read_rows)

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def reserve_anchor_split(self, n: int) -> "Corpus":
        """Move the last ``n`` dev blocks into the anchor-selection split (no-op for n = 0)."""
        if n > 0:
            if n >= len(self.dev_blocks):
                raise UserError(f"data.anchor_blocks={n} leaves no dev blocks (the data has {len(self.dev_blocks)})")
            self.dev_blocks, self.anchor_blocks = self.dev_blocks[:-n], self.dev_blocks[-n:]
        return self

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def collate(self, blocks: np.ndarray, generator: Optional[torch.Generator] = None) -> dict:
        """A masked-LM batch of ``blocks``; masks drawn from ``generator`` (None: torch's global generator)."""
        ids = torch.from_numpy(np.asarray(blocks).astype(np.int64))
        special = torch.tensor(sorted(self.tokenizer.all_special_ids), dtype=torch.long)
        inputs, labels = mask_tokens(ids, generator, self.mlm_probability, self.vocab_size, self.tokenizer.mask_token_id, special)
        return {"input_ids": inputs, "labels": labels, "attention_mask": torch.ones_like(inputs)}

    def _epoch_permutation(self, seed: int, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``: a pure function of (seed, epoch), cached (a large corpus has millions of blocks)."""
        key = (int(seed), int(epoch))
        with self._lock:
            perm = self._perms.get(key)
            if perm is None:
                perm = np.random.default_rng([seed, int(epoch)]).permutation(len(self.train_blocks))
                if len(self._perms) >= 2:  # the current epoch and the next one cover every batch
                    self._perms.pop(next(iter(self._perms)))
                self._perms[key] = perm
            return perm

    def train_batch_indices(self, seed: int, micro_step: int, batch_size: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Indices of train blocks for one micro-batch; epoch permutations depend only on (seed, epoch).

        Rank r of w takes the r-th of w consecutive slices of the global order, so ranks never share a block
        within an epoch.
        """
        n = len(self.train_blocks)
        start = (micro_step * world + rank) * batch_size
        idx = np.arange(start, start + batch_size)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(idx // n):
            perm = self._epoch_permutation(seed, int(epoch))
            sel = idx // n == epoch
            out[sel] = perm[idx[sel] % n]
        return out

    def train_batch(self, seed: int, step: int, micro: int, grad_accum: int, batch_size: int, world: World = World()) -> tuple[int, dict]:
        """(seed, batch) of one micro-batch: blocks, masks and dropout seed are functions of (seed, step, micro, rank)."""
        mseed = micro_seed(seed, step, micro, world.rank)
        idx = self.train_batch_indices(seed, step * grad_accum + micro, batch_size, world.rank, world.size)
        return mseed, self.collate(self.read_rows(idx), torch_generator(mseed))

    def read_rows(self, idx: np.ndarray) -> np.ndarray:
        """Train blocks ``idx``. From a memory map they are read with pread, not through the map: a page
        fault maps the neighbouring cached pages too (fault-around, readahead), so slicing the map would
        grow the process's RSS by ~64 KiB per block read until the whole file counted as resident."""
        blocks = self.train_blocks
        if not isinstance(blocks, np.memmap) or blocks.filename is None:
            return np.asarray(blocks[idx])
        rows = np.empty((len(idx), blocks.shape[1]), dtype=blocks.dtype)
        width = rows.strides[0]
        with self._lock:
            if self._fd is None:
                self._fd = os.open(blocks.filename, os.O_RDONLY)
        for i, row in enumerate(idx):
            rows[i] = np.frombuffer(os.pread(self._fd, width, blocks.offset + int(row) * width), dtype=blocks.dtype)
        return rows

    def _fixed_batches(self, blocks: np.ndarray, batch_size: int, seed: int) -> list[dict]:
        generator = torch_generator(seed)  # one stream over the batches in order: the same masks every time
        return [self.collate(blocks[i : i + batch_size], generator) for i in range(0, len(blocks), batch_size)]

    def dev_batches(self, batch_size: int, num_batches: int) -> list[dict]:
        """Fixed, pre-masked dev batches: the same positions are masked for every child and run."""
        return self._fixed_batches(self.dev_blocks[: batch_size * num_batches], batch_size, DEV_MASK_SEED)

    def anchor_batches(self, batch_size: int) -> list[dict]:
        """Every anchor-selection block, pre-masked with its own fixed seed (same masks for all children)."""
        if self.anchor_blocks is None or len(self.anchor_blocks) == 0:
            raise UserError("no anchor-selection split: set data.anchor_blocks")
        return self._fixed_batches(self.anchor_blocks, batch_size, ANCHOR_MASK_SEED)

    def unigram_entropy(self, dev: list[dict]) -> float:
        """Cross-entropy (nats) of the dev masked tokens under the train unigram distribution (add-one)."""
        counts = self.counts
        if counts is None:
            counts = np.bincount(np.asarray(self.train_blocks).ravel(), minlength=self.vocab_size)
        counts = counts.astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        targets = torch.cat([b["labels"][b["labels"] != -100] for b in dev]).numpy()
        return float(-logp[targets].mean())


def micro_batches(corpus: Corpus, t, step: int, device: torch.device, world: World = World()) -> Iterator[tuple[int, dict]]:
    """The micro-batches of training step ``step`` with their seeds: batch, masking and dropout are
    functions of (seed, step, micro, rank) only. Shared by the supernet trainer and standalone children."""
    for micro in range(t.grad_accum):
        seed, batch = corpus.train_batch(t.seed, step, micro, t.grad_accum, t.batch_size, world)
        yield seed, {k: v.to(device) for k, v in batch.items()}


# --- where a run's data come from -----------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("NASFAST_CACHE", Path.home() / ".cache" / "nasfast"))


def _cache_root(cfg: DataConfig) -> Path:
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    if cache.exists() and not cache.is_dir():
        key = "data.cache_dir" if cfg.cache_dir else "$NASFAST_CACHE (or ~/.cache/nasfast)"
        raise UserError(f"{key} {cache} is a file; it must be a folder")
    return cache


def cached_prepared(cfg: DataConfig, num_proc: Optional[int] = None, progress: bool = False) -> Path:
    """The cache's prepared folder for ``cfg.corpus``: prepared on first use; an older cache entry
    (blocks.npz) is converted, keeping its tokenizer."""
    root = _cache_root(cfg)
    key = data_key(cfg, resolve_sources(cfg.corpus))
    folder = root / "prepared" / key
    if (folder / "manifest.json").is_file():
        return folder
    try:
        legacy = root / "corpus" / key
        if (legacy / "blocks.npz").is_file() and (legacy / "tokenizer").is_dir():
            convert_legacy(legacy, folder, cfg)
        else:
            prepare(cfg, folder, num_proc or cfg.num_proc, progress, "--num-proc" if num_proc else "data.num_proc")
    except OSError as exc:
        raise UserError(f"cannot write the data cache {root}: {exc.strerror or exc} "
                        "(set data.cache_dir or $NASFAST_CACHE to a writable folder)") from None
    return folder


def _load_npz(folder: Path, mlm_probability: float) -> Corpus:
    """A folder with blocks.npz + tokenizer/ (a run's small-data copy, or data prepared by older nasfast)."""
    blocks = folder / "blocks.npz"
    try:
        with np.load(blocks) as saved:
            train, dev = saved["train"], saved["dev"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{blocks} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:80]})") from None
    try:
        tokenizer = load_tokenizer(folder / "tokenizer")
    except Exception as exc:  # transformers/tokenizers raise many types for a damaged folder
        raise UserError(f"the tokenizer in {folder / 'tokenizer'} cannot be loaded ({type(exc).__name__})") from None
    return Corpus(tokenizer, train, dev, mlm_probability)


def _load_folder(folder: Path, mlm_probability: float) -> Corpus:
    """A prepared folder (memory-mapped) or an older blocks.npz folder."""
    if (folder / "manifest.json").is_file():
        manifest, tokenizer, train, dev, counts = open_prepared(folder)
        return Corpus(tokenizer, train, dev, mlm_probability, counts=counts,
                      source={"path": str(folder.resolve()), "hash": manifest["hash"]})
    return _load_npz(folder, mlm_probability)


def _load_prepared(cfg: DataConfig) -> Corpus:
    folder = Path(cfg.prepared).expanduser()
    if not (folder / "manifest.json").is_file() and not ((folder / "blocks.npz").is_file() and (folder / "tokenizer").is_dir()):
        raise UserError(f"data.prepared: {folder} has no blocks.npz and tokenizer/ nor a manifest.json "
                        "(run nasfast prepare-data, or point at a run's data/ folder)")
    corpus = _load_folder(folder, cfg.mlm_probability)
    width = corpus.train_blocks.shape[1]
    if width != cfg.block_size:
        raise UserError(f"data.prepared: {folder} holds blocks of {width} tokens but data.block_size is {cfg.block_size}")
    return corpus


def _token_mb(corpus: Corpus) -> float:
    return (corpus.train_blocks.size + corpus.dev_blocks.size) * corpus.train_blocks.dtype.itemsize / 2**20


def _install(corpus: Corpus, source: Path, data_dir: Path, copy: bool) -> None:
    """The run's data/: the tokenizer, and a copy of the blocks (``copy``) or a reference by path + hash.

    Written beside and renamed into place, replacing what a killed start left; never a foreign folder.
    """
    for stale in data_dir.parent.glob(f".{data_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if data_dir.exists():
        foreign = sorted({p.name for p in data_dir.iterdir()} - {"blocks.npz", "tokenizer", REFERENCE})
        if foreign:  # never delete a folder that nasfast did not write
            raise UserError(f"{data_dir} is not a nasfast data folder (it holds {', '.join(foreign[:3])}); "
                            "choose another --out")
    tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(data_dir, partial=tmp):  # a full disk: one line naming data/, no half copy left behind
        if (source / "blocks.npz").is_file():  # an older-format folder: small by construction, copied as it is
            shutil.copytree(source, tmp)
        else:
            shutil.copytree(source / "tokenizer", tmp / "tokenizer")
            if copy:
                np.savez(tmp / "blocks.npz", train=np.asarray(corpus.train_blocks), dev=np.asarray(corpus.dev_blocks))
            else:
                (tmp / REFERENCE).write_text(json.dumps(corpus.source, indent=1) + "\n")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    tmp.rename(data_dir)


def data_fingerprint(data_dir: Path) -> str:
    """Identity of a run's data for result caches: the SHA-1 of its blocks.npz copy (as always), or the
    content hash of the prepared data it references."""
    data_dir = Path(data_dir)
    if (data_dir / "blocks.npz").is_file():
        import hashlib

        h = hashlib.sha1()
        with open(data_dir / "blocks.npz", "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    try:
        return "prepared:" + json.loads((data_dir / REFERENCE).read_text())["hash"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{data_dir} has neither blocks.npz nor a readable {REFERENCE}") from None


def _load_referenced(data_dir: Path, cfg: DataConfig) -> Corpus:
    """A run's data by reference: the recorded folder (or data.prepared, if moved), whose hash must match."""
    try:
        ref = json.loads((data_dir / REFERENCE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{data_dir / REFERENCE} is corrupt ({type(exc).__name__})") from None
    candidates = [Path(cfg.prepared).expanduser()] if cfg.prepared else []
    candidates.append(Path(ref["path"]))
    folder = next((c for c in candidates if (c / "manifest.json").is_file()), None)
    if folder is None:
        raise UserError(f"the prepared data of this run ({ref['path']}, hash {ref['hash'][:12]}) are gone; "
                        "restore them or set data.prepared to a copy")
    found = read_manifest(folder)["hash"]
    if found != ref["hash"]:
        raise UserError(f"the prepared data in {folder} (hash {found[:12]}) are not the data this run trained on "
                        f"(hash {ref['hash'][:12]}); point data.prepared at the original")
    return _load_folder(folder, cfg.mlm_probability)


def build_corpus(cfg: DataConfig, run_dir: Optional[Path] = None, fresh: bool = False, require: bool = False) -> Corpus:
    """Tokenizer and blocks for a run: from the run folder, else from data.prepared, else from the cache
    (prepared there on first use).

    ``fresh``: a new run; a data/ folder already in ``run_dir`` (left by a start killed before its
    first checkpoint) is replaced, never reused, since its settings may differ. ``require``: the run's
    own data/ must be there (a resume: nothing else is guaranteed to reproduce its tokenizer).

    WordPiece training in ``tokenizers`` breaks ties in hash-map order, so two trainings on the same
    text can give different vocabularies. Caching the result by content key makes every run with the
    same data settings on a machine use the same tokenizer (reproducible runs, comparable children)
    and skips the rebuild. The run folder keeps its own copy of small data (up to data.copy_max_mb),
    so such a run never depends on the cache; larger data are recorded by path and content hash.
    """
    return _build_corpus(cfg, run_dir, fresh, require).reserve_anchor_split(cfg.anchor_blocks)


def _build_corpus(cfg: DataConfig, run_dir: Optional[Path], fresh: bool, require: bool) -> Corpus:
    data_dir = Path(run_dir) / "data" if run_dir else None
    if data_dir is not None and not fresh:
        if (data_dir / "blocks.npz").is_file():
            return _load_npz(data_dir, cfg.mlm_probability)
        if (data_dir / REFERENCE).is_file():
            return _load_referenced(data_dir, cfg)
        if require:
            raise UserError(f"run {run_dir} has no data/blocks.npz: its tokenizer and blocks are gone")
    if cfg.prepared is not None:
        source = Path(cfg.prepared).expanduser()
        corpus = _load_prepared(cfg)
    else:
        source = cached_prepared(cfg)
        corpus = _load_folder(source, cfg.mlm_probability)
    if data_dir is None:
        return corpus
    copy = _token_mb(corpus) <= cfg.copy_max_mb
    _install(corpus, source, data_dir, copy)
    if copy or (source / "blocks.npz").is_file():
        return _load_npz(data_dir, cfg.mlm_probability)  # exactly what a resume will read
    return corpus
