"""Pretraining data, fully offline: text files -> local WordPiece tokenizer -> fixed-length blocks.

- Corpus: ``default`` is the embedded corpus (``nasfast/corpus``, see its SOURCES.md), or any local
  ``.txt`` / ``.txt.gz`` files or folders of them.
- Tokenizer: WordPiece trained here with ``tokenizers``, saved in the run folder as a transformers
  ``PreTrainedTokenizerFast``.
- Blocks: ``datasets`` tokenizes and groups text into [CLS] + (block_size - 2) tokens + [SEP].
- Split: a fixed dev set (seeded independently of the training seed, so every run sees the same dev).
- Batches: the training batch of step s is a pure function of (seed, s): resume needs no iterator state.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .config import DataConfig
from .distributed import World
from .errors import UserError, warn
from .rng import micro_seed

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEV_SPLIT_SEED = 20220717  # fixed: the dev set does not depend on the training seed
DEV_MASK_SEED = 4242
ANCHOR_MASK_SEED = 4243
# Share of a corpus file's bytes that may fail to decode as UTF-8 (each becomes U+FFFD, with a
# warning); above it the file is refused: it is binary or in another encoding (latin-1, cp1252).
MAX_UNDECODABLE_SHARE = 0.01

_undecodable = [0]


def _count_undecodable(exc: UnicodeDecodeError) -> tuple[str, int]:
    """Like errors="replace" (one U+FFFD per bad sequence), counting the bytes replaced."""
    _undecodable[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("nasfast-count", _count_undecodable)


def corpus_files(entries: list) -> list[Path]:
    files: list[Path] = []
    for entry in entries:
        if entry == "default":
            root = resources.files("nasfast") / "corpus"
            files += sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".txt.gz"))
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.name.endswith((".txt", ".txt.gz")))
            if not found:
                raise UserError(f"corpus folder {path} has no .txt or .txt.gz files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"corpus path not found: {path}")
    return files


def read_lines(files: list[Path], max_chars_per_file: Optional[int]) -> list[str]:
    lines: list[str] = []
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        budget = max_chars_per_file if max_chars_per_file is not None else math.inf
        _undecodable[0], chars = 0, 0
        try:
            with opener(path, "rt", encoding="utf-8", errors="nasfast-count") as fh:
                for line in fh:
                    chars += len(line)
                    line = line.strip()
                    if line:
                        lines.append(line)
                        budget -= len(line)
                        if budget <= 0:
                            break
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"cannot read corpus file {path}: {exc}") from None
        _check_decoding(path, _undecodable[0], chars)
    if not lines:
        raise UserError(f"the corpus is empty (files: {', '.join(str(f) for f in files)})")
    return lines


def _check_decoding(path: Path, bad: int, chars: int) -> None:
    if not bad:
        return
    share = bad / max(chars, 1)
    if share > MAX_UNDECODABLE_SHARE:
        raise UserError(f"corpus file {path} is not UTF-8 text: {share:.1%} of it does not decode (binary, or another "
                        f"encoding such as latin-1?); convert it (e.g. iconv -f latin1 -t utf-8) or leave it out")
    warn(f"corpus file {path}: {bad} bytes ({share:.3%}) are not UTF-8 and were replaced by U+FFFD")


def train_tokenizer(lines: list[str], vocab_size: int, lowercase: bool):
    """Train a BERT-style WordPiece tokenizer locally and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def make_blocks(lines: list[str], tokenizer, block_size: int) -> np.ndarray:
    """Tokenize with ``datasets`` and group into [CLS] + body + [SEP] blocks (run_mlm's group_texts)."""
    from datasets import Dataset

    body = block_size - 2
    ds = Dataset.from_dict({"text": lines})
    ds = ds.map(
        lambda b: {"input_ids": tokenizer(b["text"], add_special_tokens=False)["input_ids"]},
        batched=True, remove_columns=["text"], keep_in_memory=True,
    )

    def group(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        n = len(ids) // body * body
        return {"block": [[tokenizer.cls_token_id] + ids[i : i + body] + [tokenizer.sep_token_id] for i in range(0, n, body)]}

    ds = ds.map(group, batched=True, batch_size=2000, remove_columns=["input_ids"], keep_in_memory=True)
    if len(ds) == 0:
        raise UserError(f"the corpus is too small for one block of {block_size} tokens")
    return np.asarray(ds.with_format("numpy")["block"], dtype=np.int32)


@dataclass
class Corpus:
    """Tokenized blocks split into train and dev, plus what the collator needs."""

    tokenizer: object
    train_blocks: np.ndarray  # [N, block_size] int32
    dev_blocks: np.ndarray  # evaluation dev split (estimates, ground truth, dev curves)
    mlm_probability: float
    anchor_blocks: Optional[np.ndarray] = None  # MAGIC-A anchor-selection split, disjoint from dev_blocks

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

    def collator(self):
        from transformers import DataCollatorForLanguageModeling

        # No seed: the collator draws from torch's global RNG, which the trainer seeds per (seed, step).
        return DataCollatorForLanguageModeling(self.tokenizer, mlm=True, mlm_probability=self.mlm_probability)

    def collate(self, blocks: np.ndarray) -> dict:
        batch = self.collator()([{"input_ids": b} for b in torch.from_numpy(blocks.astype(np.int64))])
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    def train_batch_indices(self, seed: int, micro_step: int, batch_size: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Indices of train blocks for one micro-batch; epoch permutations depend only on (seed, epoch)."""
        n = len(self.train_blocks)
        start = (micro_step * world + rank) * batch_size
        idx = np.arange(start, start + batch_size)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(idx // n):
            perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
            sel = idx // n == epoch
            out[sel] = perm[idx[sel] % n]
        return out

    def dev_batches(self, batch_size: int, num_batches: int) -> list[dict]:
        """Fixed, pre-masked dev batches: the same positions are masked for every child and run."""
        state = torch.random.get_rng_state()
        torch.manual_seed(DEV_MASK_SEED)
        try:
            blocks = self.dev_blocks[: batch_size * num_batches]
            return [self.collate(blocks[i : i + batch_size]) for i in range(0, len(blocks), batch_size)]
        finally:
            torch.random.set_rng_state(state)

    def anchor_batches(self, batch_size: int) -> list[dict]:
        """Every anchor-selection block, pre-masked with its own fixed seed (same masks for all children)."""
        if self.anchor_blocks is None or len(self.anchor_blocks) == 0:
            raise UserError("no anchor-selection split: set data.anchor_blocks")
        state = torch.random.get_rng_state()
        torch.manual_seed(ANCHOR_MASK_SEED)
        try:
            blocks = self.anchor_blocks
            return [self.collate(blocks[i : i + batch_size]) for i in range(0, len(blocks), batch_size)]
        finally:
            torch.random.set_rng_state(state)

    def unigram_entropy(self, dev: list[dict]) -> float:
        """Cross-entropy (nats) of the dev masked tokens under the train unigram distribution (add-one)."""
        counts = np.bincount(self.train_blocks.ravel(), minlength=self.vocab_size).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        targets = torch.cat([b["labels"][b["labels"] != -100] for b in dev]).numpy()
        return float(-logp[targets].mean())


def _data_key(cfg: DataConfig, files: list[Path]) -> str:
    """Content key of a tokenized corpus: the data settings and each file's name, size and mtime."""
    stamp = [(str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    fields = {k: v for k, v in asdict(cfg).items() if k not in ("mlm_probability", "cache_dir", "anchor_blocks", "prepared")}
    return hashlib.sha256(json.dumps([fields, stamp], sort_keys=True).encode()).hexdigest()[:16]


def _save(folder: Path, tokenizer, train: np.ndarray, dev: np.ndarray) -> None:
    """Write tokenizer + blocks into a temp folder, then rename it into place (atomic)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        np.savez(tmp / "blocks.npz", train=train, dev=dev)
    except OSError as exc:
        raise UserError(f"cannot write the data cache {folder.parent.parent}: {exc.strerror or exc} "
                        "(set data.cache_dir or $NASFAST_CACHE to a writable folder)") from None
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; its copy is identical in purpose
        shutil.rmtree(tmp, ignore_errors=True)


def _install(cached: Path, data_dir: Path) -> None:
    """Copy the cached corpus into the run folder as data/, replacing an old one, via a temp folder."""
    for stale in data_dir.parent.glob(f".{data_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if data_dir.exists():
        foreign = sorted({p.name for p in data_dir.iterdir()} - {"blocks.npz", "tokenizer"})
        if foreign:  # never delete a folder that nasfast did not write
            raise UserError(f"{data_dir} is not a nasfast data folder (it holds {', '.join(foreign[:3])}); "
                            "choose another --out")
    tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}")
    shutil.copytree(cached, tmp)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    tmp.rename(data_dir)


def _load(folder: Path, mlm_probability: float) -> Corpus:
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


def default_cache_dir() -> Path:
    return Path(os.environ.get("NASFAST_CACHE", Path.home() / ".cache" / "nasfast"))


def _cache_root(cfg: DataConfig) -> Path:
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    if cache.exists() and not cache.is_dir():
        key = "data.cache_dir" if cfg.cache_dir else "$NASFAST_CACHE (or ~/.cache/nasfast)"
        raise UserError(f"{key} {cache} is a file; it must be a folder")
    return cache


def build_corpus(cfg: DataConfig, run_dir: Optional[Path] = None, fresh: bool = False, require: bool = False) -> Corpus:
    """Tokenizer and blocks for a run: from the run folder, else from the data cache, else built.

    ``fresh``: a new run; a data/ folder already in ``run_dir`` (left by a start killed before its
    first checkpoint) is replaced, never reused, since its settings may differ. ``require``: the run's
    own data/ must be there (a resume: nothing else is guaranteed to reproduce its tokenizer).

    WordPiece training in ``tokenizers`` breaks ties in hash-map order, so two trainings on the same
    text can give different vocabularies. Caching the result by content key makes every run with the
    same data settings on a machine use the same tokenizer (reproducible runs, comparable children)
    and skips the rebuild; the run folder keeps its own copy so a run never depends on the cache.
    """
    return _build_corpus(cfg, run_dir, fresh, require).reserve_anchor_split(cfg.anchor_blocks)


def _load_prepared(cfg: DataConfig) -> Corpus:
    folder = Path(cfg.prepared).expanduser()
    if not (folder / "blocks.npz").is_file() or not (folder / "tokenizer").is_dir():
        raise UserError(f"data.prepared: {folder} has no blocks.npz and tokenizer/ (a run's data/ folder has both)")
    corpus = _load(folder, cfg.mlm_probability)
    width = corpus.train_blocks.shape[1]
    if width != cfg.block_size:
        raise UserError(f"data.prepared: {folder} holds blocks of {width} tokens but data.block_size is {cfg.block_size}")
    return corpus


def _build_corpus(cfg: DataConfig, run_dir: Optional[Path], fresh: bool, require: bool) -> Corpus:
    data_dir = Path(run_dir) / "data" if run_dir else None
    if data_dir is not None and not fresh:
        if (data_dir / "blocks.npz").is_file():
            return _load(data_dir, cfg.mlm_probability)
        if require:
            raise UserError(f"run {run_dir} has no data/blocks.npz: its tokenizer and blocks are gone")
    if cfg.prepared is not None:
        corpus = _load_prepared(cfg)
        if data_dir is not None:
            _install(Path(cfg.prepared).expanduser(), data_dir)
        return corpus
    files = corpus_files(cfg.corpus)
    cached = _cache_root(cfg) / "corpus" / _data_key(cfg, files)
    if not (cached / "blocks.npz").is_file():
        lines = read_lines(files, cfg.max_chars_per_file)
        tokenizer = train_tokenizer(lines, cfg.vocab_size, cfg.lowercase)
        blocks = make_blocks(lines, tokenizer, cfg.block_size)
        if len(blocks) <= cfg.dev_blocks:
            raise UserError(f"the corpus gives {len(blocks)} blocks, not more than data.dev_blocks={cfg.dev_blocks}")
        perm = np.random.default_rng(DEV_SPLIT_SEED).permutation(len(blocks))
        dev, train = blocks[perm[: cfg.dev_blocks]], blocks[np.sort(perm[cfg.dev_blocks :])]
        _save(cached, tokenizer, train, dev)
    if data_dir is not None:
        _install(cached, data_dir)
    return _load(cached, cfg.mlm_probability)


def micro_batches(corpus: Corpus, t, step: int, device: torch.device, world: World = World()):
    """The micro-batches of training step ``step`` with their seeds: batch, masking and dropout are
    functions of (seed, step, micro, rank) only. Shared by the supernet trainer and standalone children."""
    for micro in range(t.grad_accum):
        seed = micro_seed(t.seed, step, micro, world.rank)
        torch.manual_seed(seed)  # masking; dropout is reseeded per layer from the same seed
        idx = corpus.train_batch_indices(t.seed, step * t.grad_accum + micro, t.batch_size, world.rank, world.size)
        yield seed, {k: v.to(device) for k, v in corpus.collate(corpus.train_blocks[idx]).items()}
