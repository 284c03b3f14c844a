"""Corpora: which files hold which documents, and their one-time tokenization into token shards.

    shards = prepare_corpus("enwiki", tokenizer, split="train", max_shards=1)   # -> [Path, ...]

Corpora and how they are cut into documents and splits:
- 'enwiki': <data_dir>/enwiki2015/enwiki2015_train_0{0..7}.txt.xz (train; `max_shards` takes the
  first k) and enwiki2015_val.txt.xz (val). One document per article.
- 'tinyshakespeare': <data_dir>/tinyshakespeare/input.txt; the first 90% of its characters are train,
  the last 10% val (contiguous, as in nanoGPT). Each split is cut into documents at blank lines,
  i.e. one document per speech, so that several ranks can share it.
- 'fineweb-edu': HuggingFaceFW/fineweb-edu, config sample-10BT, column 'text', streamed in its
  published order with `datasets` (network). Parquet files in <data_dir>/fineweb-edu/ are read
  instead of the hub when present. The first FINEWEB_VAL_DOCS documents are val; train shard k holds
  the next FINEWEB_DOCS_PER_SHARD documents after shard k-1; `max_shards` says how many to take.
- a path: a .txt / .txt.xz / .jsonl (field 'text') / .parquet (column 'text') file, or a folder of
  them (not recursive). Text files: documents are separated by a blank line ("\\n\\n"); jsonl and
  parquet: one document per row. Splits: files whose name has the word 'val' are val and the others
  train; with no such file, the last file (by name) of a folder is val; a lone file gives its first
  90% (characters of text, rows of a table) to train and the rest to val.

Token shards (one per source file, in cache_dir()/tokens/<corpus>-<tokenizer.name>/):
    <name>.bin        the tokens of all documents, back to back, each document starting with BOS;
                      uint16 when the vocabulary fits in 16 bits, else uint32
    <name>.docs.npy   int64 document offsets into .bin, length num_docs + 1
    <name>.json       meta data; written last, so a shard without it is incomplete and is rebuilt
A file lock per shard lets every rank of a run call prepare_corpus at once: one tokenizes, the
others wait and then reuse its shard.
"""

import fcntl
import hashlib
import itertools
import json
import lzma
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanochat.common import cache_dir, resolve_data_dir

CORPORA = ("enwiki", "tinyshakespeare", "fineweb-edu")
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".txt.xz")
TABLE_SUFFIXES = (".jsonl", ".parquet")
TRAIN_FRACTION = 0.9  # a lone file: first 90% train, last 10% val
FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")
FINEWEB_VAL_DOCS = 20_000  # about 20M tokens
FINEWEB_DOCS_PER_SHARD = 100_000  # about 100M tokens, 200 MB as uint16
SHARD_FORMAT = 1
ENCODE_BATCH_CHARS = 1 << 22  # documents per tiktoken batch call: enough work for every thread


@dataclass(frozen=True)
class Source:
    """One source file (or slice of the fineweb-edu stream) that becomes one token shard."""
    name: str  # shard file name stem, unique within the corpus
    path: Path | None  # None: the fineweb-edu stream
    part: tuple = (0.0, 1.0)  # fraction of the file: characters of text, rows of a table
    doc_range: tuple | None = None  # fineweb-edu stream: documents [start, stop)


# ----------------------------------------------------------------------------- sources and documents

def corpus_sources(corpus: str, split: str = "train", data_dir=None, max_shards=None) -> tuple[str, list[Source]]:
    """(cache key, sources) of a corpus split; checks that the files exist before any work."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}")
    if max_shards is not None and (not isinstance(max_shards, int) or max_shards < 1):
        raise ValueError(f"max_shards={max_shards!r}; use a positive int, or None for all train files")
    if corpus == "enwiki":
        folder = resolve_data_dir(data_dir) / "enwiki2015"
        names = ["enwiki2015_val"] if split == "val" else [f"enwiki2015_train_{i:02d}" for i in range(8)]
        names = names[:max_shards] if split == "train" and max_shards else names
        sources = [Source(n, folder / (n + ".txt.xz")) for n in names]
    elif corpus == "tinyshakespeare":
        path = resolve_data_dir(data_dir) / "tinyshakespeare" / "input.txt"
        part = (0.0, TRAIN_FRACTION) if split == "train" else (TRAIN_FRACTION, 1.0)
        sources = [Source(split, path, part)]
    elif corpus == "fineweb-edu":
        if split == "val":
            sources = [Source("val", None, doc_range=(0, FINEWEB_VAL_DOCS))]
        else:
            count = max_shards or 1000  # None: until the stream ends (10BT is about 100 shards)
            sources = [Source(f"train_{k:04d}", None,
                              doc_range=(FINEWEB_VAL_DOCS + k * FINEWEB_DOCS_PER_SHARD,
                                         FINEWEB_VAL_DOCS + (k + 1) * FINEWEB_DOCS_PER_SHARD))
                       for k in range(count)]
        return corpus, sources
    else:
        return _path_sources(corpus, split, max_shards)
    for source in sources:
        if not source.path.is_file():
            raise FileNotFoundError(
                f"{source.path} is missing (corpus {corpus!r}). Fetch the bundled data with: "
                f"python scripts/download_data.py --data_dir {source.path.parents[1]}"
            )
    return corpus, sources


def _path_sources(corpus: str, split: str, max_shards) -> tuple[str, list[Source]]:
    path = Path(corpus).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus {corpus!r} is neither one of {CORPORA} nor an existing file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and _is_supported(p))
    if not files or not all(_is_supported(p) for p in files):
        raise ValueError(f"{path}: no corpus files; supported: {TEXT_SUFFIXES + TABLE_SUFFIXES} (a file or a folder of them)")
    stems = [p.name.split(".")[0] for p in files]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{path}: two files share a name stem ({stems}); rename one")
    is_val = [re.search(r"(^|[^a-z])val([^a-z]|$)", s.lower()) is not None for s in stems]
    if any(is_val):
        chosen = [Source(s, p) for s, p, v in zip(stems, files, is_val) if v == (split == "val")]
    elif len(files) > 1:
        chosen = [Source(s, p) for s, p in zip(stems, files)]
        chosen = chosen[-1:] if split == "val" else chosen[:-1]
    else:
        part = (0.0, TRAIN_FRACTION) if split == "train" else (TRAIN_FRACTION, 1.0)
        chosen = [Source(f"{stems[0]}-{split}", files[0], part)]
    if not chosen:
        raise ValueError(f"{path}: no {split} files (names with the word 'val' are val, the others train)")
    if split == "train" and max_shards:
        chosen = chosen[:max_shards]
    key = f"{path.name.split('.')[0]}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
    return key, chosen


def _is_supported(path: Path) -> bool:
    return path.name.endswith(TEXT_SUFFIXES + TABLE_SUFFIXES)


def iter_documents(corpus: str, split: str = "train", data_dir=None, max_shards=None):
    """Every document (a str) of a corpus split, in order; for tokenizer training and inspection."""
    _, sources = corpus_sources(corpus, split, data_dir, max_shards)
    if corpus == "fineweb-edu":
        yield from itertools.islice(fineweb_documents(data_dir), sources[0].doc_range[0], sources[-1].doc_range[1])
        return
    for source in sources:
        yield from read_documents(source)


def read_documents(source: Source):
    """The documents of one source file (its `part` only), skipping empty ones."""
    path, (lo, hi) = source.path, source.part
    if path.name.endswith(TEXT_SUFFIXES):
        opener = lzma.open if path.name.endswith(".xz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        text = text[int(lo * len(text)):int(hi * len(text))]
        for doc in text.split("\n\n"):
            doc = doc.strip("\n")
            if doc.strip():
                yield doc
        return
    if path.name.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        rows = lines[int(lo * len(lines)):int(hi * len(lines))]
        texts = (_text_field(json.loads(line), path, i) for i, line in enumerate(rows))
    else:
        texts = _parquet_texts(path, lo, hi)
    for text in texts:
        if text.strip():
            yield text


def _text_field(row, path, index):
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f"{path}: row {index} has no string field 'text'; every jsonl row needs one")
    return row["text"]


def _parquet_texts(path, lo, hi):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise ValueError(f"{path}: no column 'text' (columns: {parquet.schema_arrow.names})")
    num_rows = parquet.metadata.num_rows
    start, stop = int(lo * num_rows), int(hi * num_rows)
    row = 0
    for batch in parquet.iter_batches(columns=["text"], batch_size=8192):
        texts = batch.column(0).to_pylist()
        for text in texts[max(0, start - row):max(0, stop - row)]:
            yield text or ""
        row += len(texts)
        if row >= stop:
            return


def fineweb_documents(data_dir=None):
    """The 'text' of every fineweb-edu document, streamed: local parquet files if present, else the hub."""
    import datasets

    local = []
    try:
        folder = resolve_data_dir(data_dir) / "fineweb-edu"
        local = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    except FileNotFoundError:
        pass  # no data folder: stream from the hub
    if local:
        stream = datasets.load_dataset("parquet", data_files=[str(p) for p in local], split="train", streaming=True)
    else:
        repo, config = FINEWEB_EDU
        stream = datasets.load_dataset(repo, name=config, split="train", streaming=True)
    for row in stream.select_columns(["text"]):
        yield row["text"] or ""


# ----------------------------------------------------------------------------- token shards

def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare_corpus(corpus, tokenizer, split="train", data_dir=None, max_shards=None, out_dir=None) -> list[Path]:
    """Tokenize a corpus split once into token shards (cached) and return their .bin paths."""
    key, sources = corpus_sources(corpus, split, data_dir, max_shards)
    folder = cache_dir(out_dir) / "tokens" / f"{key}-{tokenizer.name}"
    folder.mkdir(parents=True, exist_ok=True)
    if corpus == "fineweb-edu":
        shards = _prepare_stream_shards(sources, tokenizer, folder, fineweb_documents(data_dir))
    else:
        shards = [_prepare_shard(folder / f"{s.name}.bin", tokenizer, _file_signature(s),
                                 lambda s=s: read_documents(s)) for s in sources]
    if sum(load_shard(p)[2]["num_docs"] for p in shards) == 0:
        files = ", ".join(str(s.path or s.doc_range) for s in sources)
        raise ValueError(f"corpus {corpus!r} split {split!r} has no documents (all empty): {files}")
    return shards


def _prepare_stream_shards(sources, tokenizer, folder, documents) -> list[Path]:
    """Shards that are consecutive slices of one document stream (fineweb-edu): one pass over it."""
    shards, position = [], 0
    for source in sources:
        start, stop = source.doc_range
        for _ in itertools.islice(documents, start - position):
            pass  # skip documents before this slice (val is read from the stream's start)
        position = stop
        signature = {"dataset": "/".join(FINEWEB_EDU), "doc_range": list(source.doc_range)}
        path = _prepare_shard(folder / f"{source.name}.bin", tokenizer, signature,
                              lambda: (d for d in itertools.islice(documents, stop - start) if d.strip()),
                              skip=lambda: sum(1 for _ in itertools.islice(documents, stop - start)))
        if load_shard(path)[2]["num_docs"] == 0:
            break  # the stream has ended
        shards.append(path)
    return shards


def _file_signature(source: Source) -> dict:
    stat = source.path.stat()
    return {"file": source.path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "part": list(source.part)}


def _prepare_shard(bin_path: Path, tokenizer, signature: dict, documents_fn, skip=None) -> Path:
    """Build one shard unless a complete one with the same source and tokenizer exists."""
    with open(bin_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be writing this shard: wait for it
        if _shard_is_complete(bin_path, tokenizer, signature):
            if skip is not None:
                skip()
            return bin_path
        _write_shard(bin_path, tokenizer, signature, documents_fn())
    return bin_path


def _shard_is_complete(bin_path: Path, tokenizer, signature: dict) -> bool:
    meta_path = bin_path.with_suffix(".json")
    if not (meta_path.is_file() and bin_path.is_file() and bin_path.with_suffix(".docs.npy").is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    itemsize = np.dtype(meta.get("dtype", "uint8")).itemsize
    return (meta.get("format") == SHARD_FORMAT and meta.get("tokenizer") == tokenizer.name
            and meta.get("source") == signature and bin_path.stat().st_size == meta["num_tokens"] * itemsize)


def _write_shard(bin_path: Path, tokenizer, signature: dict, documents):
    """Write .bin and .docs.npy through temporary names, then .json last: the completion mark. The
    temporary names carry the process id: runs started at once on one cache write side by side."""
    meta_path, docs_path = bin_path.with_suffix(".json"), bin_path.with_suffix(".docs.npy")
    meta_path.unlink(missing_ok=True)  # a stale mark must not vouch for the files written below
    dtype = token_dtype(tokenizer.vocab_size)
    t0 = time.time()
    doc_lengths = []
    tmp_bin = bin_path.with_name(bin_path.name + f".{os.getpid()}.tmp")
    with open(tmp_bin, "wb") as f:
        for batch in _batches_by_chars(documents, ENCODE_BATCH_CHARS):
            encoded = tokenizer.encode_batch(batch, prepend_bos=True)
            lengths = [len(ids) for ids in encoded]
            doc_lengths.extend(lengths)
            f.write(np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=sum(lengths)).tobytes())
    offsets = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
    np.cumsum(doc_lengths, out=offsets[1:])
    tmp_docs = docs_path.with_name(docs_path.name + f".{os.getpid()}.tmp")
    with open(tmp_docs, "wb") as f:
        np.save(f, offsets)
    os.replace(tmp_bin, bin_path)
    os.replace(tmp_docs, docs_path)
    meta = {"format": SHARD_FORMAT, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id, "dtype": np.dtype(dtype).name, "num_tokens": int(offsets[-1]),
            "num_docs": len(doc_lengths), "source": signature, "seconds": round(time.time() - t0, 2)}
    tmp_meta = meta_path.with_name(meta_path.name + f".{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_meta, meta_path)


def _batches_by_chars(documents, max_chars: int):
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def load_shard(bin_path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(tokens as a read-only memmap, int64 document offsets [num_docs + 1], meta dict) of a shard."""
    bin_path = Path(bin_path)
    meta_path = bin_path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{bin_path} is not a complete token shard (no {meta_path.name}); "
                                f"make shards with nanochat.dataset.prepare_corpus")
    meta = json.loads(meta_path.read_text())
    if meta["num_tokens"] == 0:
        tokens = np.zeros(0, dtype=meta["dtype"])  # mmap cannot map an empty file
    else:
        tokens = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
    offsets = np.load(bin_path.with_suffix(".docs.npy"))
    return tokens, offsets, meta
