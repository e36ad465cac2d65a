"""Prepared pretraining data: tokenize once, streaming, into memory-mapped token blocks.

A prepared-data folder holds::

    manifest.json   format, content hash, block size, dtype, counts, inputs, settings
    tokenizer/      a transformers PreTrainedTokenizerFast (trained here, or copied from data.tokenizer)
    train.npy       [N, block_size] uint16 (uint32 for vocabularies over 65,536) — opened with mmap
    dev.npy         [M, block_size] the fixed dev split (MAGIC-A's anchor split is its tail)
    counts.npy      [vocab] unigram counts of the train tokens (the dev baseline, without a pass over train)

Blocks are made exactly as the in-memory path (``data.make_blocks``) makes them: text units in chunks of
2000, each chunk tokenized, concatenated and cut into ``[CLS] + (block_size - 2) tokens + [SEP]``,
the chunk's remainder dropped; the dev split is the same seeded permutation. So a prepared folder and
the in-memory path give bitwise the same blocks for the same tokenizer.

Memory stays bounded by design: text is read one record batch at a time, tokenized a chunk at a time
(``num_proc`` worker processes, a bounded window of chunks in flight), blocks are appended to a file;
the dev rows are then picked and the train rows copied in slices. The folder is built under a temp
name and renamed into place, so a killed prepare leaves nothing half-made (a rerun clears the leftover).

Longer than 400 lines because the streaming pipeline (read, tokenize in workers, append, split, copy,
hash, rename) is one atomic transaction over one temp folder; its stages share that folder's state.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from nasfast.config import DataConfig
from nasfast.data.sources import Source, iter_corpus, iter_source, resolve_sources
from nasfast.errors import UserError
from nasfast.faults import kill_point
from nasfast.files import writing
from nasfast.resources import cap_workers
from nasfast.rng import DEV_SPLIT_SEED

FORMAT = "nasfast-prepared/1"
CHUNK_UNITS = 2000  # text units per tokenized chunk: blocks never span chunks (run_mlm's group_texts batch)
COPY_ROWS = 1 << 13  # rows per slice when splitting train from dev (bincount widens them to int64: 8 MiB at 128 tokens)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Keys of DataConfig that do not change the tokens (left out of the cache key and the manifest settings).
NOT_TOKEN_SETTINGS = ("mlm_probability", "cache_dir", "anchor_blocks", "prepared", "copy_max_mb", "num_proc", "prefetch")
# Settings added after the cache key was defined: left out of the key at their defaults, so existing
# cache entries keep their key (and their tokenizer).
_NEW_SETTINGS = {"text_column": "text", "tokenizer": None, "tokenizer_sample_chars": DataConfig.tokenizer_sample_chars}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --- tokenizer -------------------------------------------------------------------------------------
def train_tokenizer(units: Iterable[str], vocab_size: int, lowercase: bool):
    """Train a BERT-style WordPiece tokenizer locally (from any iterator of text) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(units, trainer=trainer)
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


def load_user_tokenizer(path: str):
    """``data.tokenizer``: an existing local Hugging Face tokenizer folder (e.g. a BERT WordPiece vocabulary)."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"data.tokenizer: {folder} is not a folder (a saved Hugging Face tokenizer: tokenizer.json or vocab.txt)")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for a folder it cannot read
        raise UserError(f"data.tokenizer: cannot load a tokenizer from {folder} ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})") from None
    missing = [name for name in ("cls_token", "sep_token", "mask_token", "pad_token") if getattr(tok, name) is None]
    if missing or not tok.is_fast:
        raise UserError(f"data.tokenizer: {folder} is not a fast masked-LM tokenizer"
                        f"{' (no ' + ', '.join(missing) + ')' if missing else ''}; a BERT-style tokenizer is needed")
    return tok


def tokenizer_sample(sources: list[Source], cfg: DataConfig) -> Iterator[str]:
    """The text the tokenizer is trained on: at most ``tokenizer_sample_chars`` in all, split evenly over sources."""
    share = cfg.tokenizer_sample_chars / len(sources)
    cap = share if cfg.max_chars_per_file is None else min(share, cfg.max_chars_per_file)
    for source in sources:
        yield from iter_source(source, cfg.text_column, cap)


# --- blocks ----------------------------------------------------------------------------------------
def group_blocks(ids: list[list[int]], cls: int, sep: int, block_size: int, dtype: np.dtype) -> np.ndarray:
    """[CLS] + body + [SEP] blocks from one chunk's token ids; the chunk's remainder is dropped."""
    body = block_size - 2
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
    n = len(flat) // body
    out = np.empty((n, block_size), dtype=dtype)
    out[:, 0], out[:, -1] = cls, sep
    out[:, 1:-1] = flat[: n * body].reshape(n, body)
    return out


def tokenize_chunk(tokenizer, units: list[str], block_size: int, dtype: np.dtype) -> np.ndarray:
    """Blocks of one chunk. The Rust tokenizer is called directly: the same ids as ``tokenizer(units,
    add_special_tokens=False)`` (tested against it) without building Python BatchEncodings (faster; benchmarks/results/data_scale.md)."""
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers >= 0.21)
    ids = [e.ids for e in encode(units, add_special_tokens=False)]
    return group_blocks(ids, tokenizer.cls_token_id, tokenizer.sep_token_id, block_size, dtype)


_worker: dict = {}


def _worker_init(tokenizer_dir: str, block_size: int, dtype: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker.update(tokenizer=load_tokenizer(Path(tokenizer_dir)), block_size=block_size, dtype=np.dtype(dtype))


def _worker_chunk(units: list[str]) -> np.ndarray:
    return tokenize_chunk(_worker["tokenizer"], units, _worker["block_size"], _worker["dtype"])


def _chunks(units: Iterator[str], digest) -> Iterator[list[str]]:
    while True:
        chunk = list(itertools.islice(units, CHUNK_UNITS))
        if not chunk:
            return
        for unit in chunk:
            digest.update(unit.encode("utf-8", "surrogatepass"))
            digest.update(b"\n")
        yield chunk


def _block_stream(chunks: Iterator[list[str]], tokenizer, tokenizer_dir: Path, block_size: int, dtype: np.dtype,
                  num_proc: int, num_proc_name: str = "--num-proc") -> Iterator[np.ndarray]:
    """Blocks of each chunk, in order; with ``num_proc`` > 1, at most 2·num_proc chunks are in flight.

    A worker (~170 MB once its tokenizer is loaded) is only started for a chunk it can get: the first
    ``num_proc`` chunks are read before the pool starts, and a smaller corpus caps the pool at them."""
    if num_proc > 1:
        head = list(itertools.islice(chunks, num_proc))
        num_proc = cap_workers(num_proc, num_proc_name, len(head), f"chunk{'s' if len(head) != 1 else ''} of "
                                                                  f"{CHUNK_UNITS} text units in the corpus")
        chunks = itertools.chain(head, chunks)
    if num_proc <= 1:
        for chunk in chunks:
            yield tokenize_chunk(tokenizer, chunk, block_size, dtype)
        return
    import multiprocessing as mp

    # spawn: the parent may hold tokenizers' and torch's thread pools, which fork would copy half-alive
    with mp.get_context("spawn").Pool(num_proc, _worker_init, (str(tokenizer_dir), block_size, dtype.str)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_chunk, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_npy(path: Path, dtype: np.dtype, shape: tuple, rows: Iterable[np.ndarray], digest=None) -> None:
    """An .npy file written row-slice by row-slice through a plain file (no map: pages do not pile up in RSS)."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        for part in rows:
            data = np.ascontiguousarray(part, dtype=dtype).tobytes()
            fh.write(data)
            if digest is not None:
                digest.update(data)
        fh.flush()
        os.fsync(fh.fileno())


def _read_rows(path: Path, dtype: np.dtype, width: int, start: int, stop: int) -> np.ndarray:
    with open(path, "rb") as fh:
        fh.seek(start * width * dtype.itemsize)
        return np.fromfile(fh, dtype=dtype, count=(stop - start) * width).reshape(-1, width)


def content_hash(dtype: np.dtype, block_size: int, train_digest: str, dev_digest: str, tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    parts = [FORMAT, dtype.str, str(block_size), train_digest, dev_digest, hashlib.sha256(vocab.encode()).hexdigest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def settings_of(cfg: DataConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_TOKEN_SETTINGS}


@dataclass
class PrepareStats:
    path: Path
    train_blocks: int
    dev_blocks: int
    text_chars: int
    seconds: float
    hash: str


def _write_split(tmp: Path, all_path: Path, n: int, block_size: int, dtype: np.dtype, dev_blocks: int,
                 tokenizer, vocab: int) -> tuple[str, str]:
    """dev.npy (seeded rows, in permutation order), train.npy (the rest, in corpus order), counts.npy."""
    perm = np.random.default_rng(DEV_SPLIT_SEED).permutation(n)
    dev_idx = perm[:dev_blocks]
    is_dev = np.zeros(n, dtype=bool)
    is_dev[dev_idx] = True
    del perm
    dev = np.stack([_read_rows(all_path, dtype, block_size, int(i), int(i) + 1)[0] for i in dev_idx]) if dev_blocks else \
        np.empty((0, block_size), dtype)
    dev_digest = hashlib.sha256()
    _write_npy(tmp / "dev.npy", dtype, dev.shape, [dev], dev_digest)
    counts = np.zeros(max(vocab, 1), dtype=np.int64)

    def train_rows() -> Iterator[np.ndarray]:
        for start in range(0, n, COPY_ROWS):
            stop = min(n, start + COPY_ROWS)
            rows = _read_rows(all_path, dtype, block_size, start, stop)[~is_dev[start:stop]]
            counts[:] += np.bincount(rows.ravel(), minlength=len(counts))[: len(counts)]
            yield rows
            kill_point("prepare:train-slice")

    train_digest = hashlib.sha256()
    _write_npy(tmp / "train.npy", dtype, (n - dev_blocks, block_size), train_rows(), train_digest)
    np.save(tmp / "counts.npy", counts)
    return train_digest.hexdigest(), dev_digest.hexdigest()


def _clear_leftovers(out: Path) -> None:
    """Temp folders of prepares that were killed (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue  # another prepare of the same folder is running
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_out(out: Path, key: str) -> bool:
    """True when ``out`` already holds these data; a UserError when it holds something else."""
    if not out.exists():
        return False
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("key") == key:
                return True
        except (OSError, ValueError):
            pass
        raise UserError(f"{out} already holds other prepared data; choose another --out or delete it")
    raise UserError(f"{out} exists and is not a prepared-data folder; choose another --out")


def data_key(cfg: DataConfig, sources: list[Source]) -> str:
    """Content key of tokenized data: the token settings and each input's name, size and mtime."""
    fields = settings_of(cfg)
    for name, default in _NEW_SETTINGS.items():
        if fields.get(name) == default:
            fields.pop(name, None)
    stamp = [entry for s in sources for entry in s.stamp()]
    if cfg.tokenizer is not None:
        folder = Path(cfg.tokenizer).expanduser()
        if not folder.is_dir():
            raise UserError(f"data.tokenizer: {folder} is not a folder (a saved Hugging Face tokenizer: tokenizer.json or vocab.txt)")
        stamp += Source(folder, "tokenizer").stamp()
    return hashlib.sha256(json.dumps([fields, stamp], sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, out: Path, num_proc: int = 1, progress: bool = False,
            num_proc_name: str = "--num-proc") -> PrepareStats:
    """Tokenize ``cfg.corpus`` into the prepared-data folder ``out`` (atomic; a no-op if it is there).
    ``num_proc`` is capped at the usable cores here and at the number of chunks in ``_block_stream``."""
    out = Path(out).expanduser()
    num_proc = cap_workers(num_proc, num_proc_name)
    sources = resolve_sources(cfg.corpus)
    key = data_key(cfg, sources)
    if _check_out(out, key):
        return stats_of(out)
    started = time.perf_counter()
    try:
        with writing(out):  # a full or read-only disk: its own message (StorageError is no OSError)
            out.parent.mkdir(parents=True, exist_ok=True)
            _clear_leftovers(out)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write prepared data under {out.parent}: {exc.strerror or exc}") from None
    try:
        with writing(out, partial=tmp):
            stats = _prepare_into(tmp, cfg, sources, key, num_proc, progress, started, num_proc_name)
        kill_point("prepare:before-rename")
        try:
            tmp.rename(out)
        except OSError:  # another process prepared the same folder meanwhile; its copy serves the same purpose
            if not _check_out(out, key):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            stats = stats_of(out)  # what is there now (the winner's copy), not the discarded one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats.path = out
    return stats


def _prepare_into(tmp: Path, cfg: DataConfig, sources: list[Source], key: str, num_proc: int, progress: bool,
                  started: float, num_proc_name: str = "--num-proc") -> PrepareStats:
    if cfg.tokenizer is not None:
        tokenizer = load_user_tokenizer(cfg.tokenizer)
    else:
        tokenizer = train_tokenizer(tokenizer_sample(sources, cfg), cfg.vocab_size, cfg.lowercase)
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    vocab = len(tokenizer)
    dtype, T = token_dtype(vocab), cfg.block_size
    text_digest = hashlib.sha256()
    units = iter_corpus(sources, cfg.text_column, cfg.max_chars_per_file)
    chars = [0]

    def counted(it: Iterator[str]) -> Iterator[str]:
        for unit in it:
            chars[0] += len(unit)
            yield unit

    all_path, n = tmp / "all.bin", 0
    bar = _progress(progress)
    with open(all_path, "wb") as fh:
        for blocks in _block_stream(_chunks(counted(units), text_digest), tokenizer, tmp / "tokenizer", T, dtype, num_proc,
                                    num_proc_name):
            fh.write(blocks.tobytes())
            n += len(blocks)
            if bar is not None:
                bar.update(chars[0] - bar.n)
            kill_point("prepare:chunk")
    if bar is not None:
        bar.close()
    if chars[0] == 0:
        raise UserError(f"the corpus is empty (inputs: {', '.join(str(s.path) for s in sources)})")
    if n == 0:
        raise UserError(f"the corpus is too small for one block of {T} tokens")
    if n <= cfg.dev_blocks:
        raise UserError(f"the corpus gives {n} blocks, not more than data.dev_blocks={cfg.dev_blocks}")
    train_digest, dev_digest = _write_split(tmp, all_path, n, T, dtype, cfg.dev_blocks, tokenizer, vocab)
    all_path.unlink()
    digest = content_hash(dtype, T, train_digest, dev_digest, tokenizer)
    seconds = time.perf_counter() - started
    manifest = {
        "format": FORMAT, "hash": digest, "key": key, "block_size": T, "dtype": dtype.name, "vocab_size": vocab,
        "train_blocks": n - cfg.dev_blocks, "dev_blocks": cfg.dev_blocks, "tokens": n * T, "text_chars": chars[0],
        "text_sha256": text_digest.hexdigest(), "inputs": [{"path": str(s.path), "kind": s.kind} for s in sources],
        "settings": settings_of(cfg), "prepare_s": round(seconds, 3), "num_proc": num_proc,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return PrepareStats(tmp, n - cfg.dev_blocks, cfg.dev_blocks, chars[0], seconds, digest)


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="char", unit_scale=True, desc="tokenizing", mininterval=1.0)


def convert_legacy(folder: Path, out: Path, cfg: DataConfig) -> None:
    """A folder with ``blocks.npz`` + ``tokenizer/`` (older nasfast) rewritten as a prepared folder, same tokens."""
    import zipfile

    try:
        with np.load(folder / "blocks.npz") as saved:
            train, dev = saved["train"], saved["dev"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{folder / 'blocks.npz'} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:80]})") from None
    tokenizer = load_tokenizer(folder / "tokenizer")
    vocab = len(tokenizer)
    dtype, T = token_dtype(vocab), train.shape[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(out, partial=tmp):
            shutil.copytree(folder / "tokenizer", tmp / "tokenizer")
            train_digest, dev_digest = hashlib.sha256(), hashlib.sha256()
            _write_npy(tmp / "train.npy", dtype, train.shape, [train], train_digest)
            _write_npy(tmp / "dev.npy", dtype, dev.shape, [dev], dev_digest)
            np.save(tmp / "counts.npy", np.bincount(train.ravel(), minlength=vocab).astype(np.int64))
            manifest = {
                "format": FORMAT, "hash": content_hash(dtype, T, train_digest.hexdigest(), dev_digest.hexdigest(), tokenizer),
                "key": None, "block_size": T, "dtype": dtype.name, "vocab_size": vocab, "train_blocks": len(train),
                "dev_blocks": len(dev), "tokens": (len(train) + len(dev)) * T, "converted_from": str(folder),
                "settings": settings_of(cfg),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another process converted it meanwhile
            if not (out / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- reading ---------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} is not a prepared-data folder (no manifest.json; run nasfast prepare-data)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is corrupt ({type(exc).__name__})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{folder} holds prepared data of format {manifest.get('format')!r}; this nasfast reads {FORMAT!r}")
    return manifest


def stats_of(folder: Path) -> PrepareStats:
    m = read_manifest(folder)
    return PrepareStats(folder, m["train_blocks"], m["dev_blocks"], m.get("text_chars", 0), m.get("prepare_s", 0.0), m["hash"])


def open_prepared(folder: Path) -> tuple[dict, object, np.ndarray, np.ndarray, np.ndarray]:
    """(manifest, tokenizer, train as a read-only memory map, dev in memory, counts) of a prepared folder."""
    manifest = read_manifest(folder)
    try:
        train = np.load(folder / "train.npy", mmap_mode="r")
        dev = np.load(folder / "dev.npy")
        counts = np.load(folder / "counts.npy")
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"the prepared data in {folder} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:80]})") from None
    expect = (manifest["train_blocks"], manifest["block_size"])
    if train.shape != expect or dev.shape != (manifest["dev_blocks"], manifest["block_size"]):
        raise UserError(f"the prepared data in {folder} is corrupt or truncated (train {train.shape}, manifest says {expect})")
    try:
        tokenizer = load_tokenizer(folder / "tokenizer")
    except Exception as exc:  # transformers/tokenizers raise many types for a damaged folder
        raise UserError(f"the tokenizer in {folder / 'tokenizer'} cannot be loaded ({type(exc).__name__})") from None
    return manifest, tokenizer, train, dev, counts
