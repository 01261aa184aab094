"""Text in, packed token sequences out: documents, split, tokenizer, cache, batches.

The pipeline `prepare()` runs, in order:

1. `read_documents`: `--data` paths (text files, folders of .txt / .jsonl) or, with none, a
   default corpus of Python source: the running interpreter's standard library, or a seeded
   sample of its installed packages' sources (site-packages; compare_lm.py's default). Every
   file is read and checked here, so bad data fails before any training starts. Long documents
   are cut at line boundaries into pieces of at most `doc_chars` characters, so that a single
   large text file can still be split.
2. `split_documents`: train / validation by document, from a seed.
3. `train_tokenizer`: byte-level BPE on the training split (or a given tokenizer.json).
4. Tokenize both splits, each document followed by the end-of-text token, into one flat stream
   per split, cached on disk under a key that hashes the documents, the split and the tokenizer.
5. `PackedBatches`: the stream cut into fixed-length sequences; global batch `i` is a pure
   function of (seed, i), so the data position saved in a checkpoint is just the step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import site
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hgrn2mini.checkpoint import atomic_write, atomic_write_bytes

EOT = "<|endoftext|>"  # separates documents in the packed stream; the only special token
TEXT_SUFFIXES = (".txt", ".jsonl")  # what a --data folder is searched for
CACHE_FORMAT = "2"  # part of every cache key: bump when the same inputs would tokenize differently


class DataError(ValueError):
    """Bad --data / --tokenizer input, reported before training starts."""


@dataclass(frozen=True)
class Document:
    name: str  # where it came from, for error messages: "path" or "path:line"
    text: str


# ---------------------------------------------------------------------------------------------
# 1. Reading documents
# ---------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources, sorted: the default corpus.

    Installed packages are left out (they differ between machines), and so are the stdlib's own
    test suites: half the bytes, much of it generated data and deliberately odd code, and more
    text than a CPU run gets through (CPython 3.11: ~730 files, 12 MB, ~3.5M tokens).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = [p for p in root.rglob("*.py") if not (skip & set(p.relative_to(root).parts)) and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def site_packages_files(max_bytes: int, seed: int) -> list[Path]:
    """A seeded random sample of the installed packages' .py files, up to max_bytes in all.

    Hundreds of MB of real code on a machine with torch installed, no download; sampled rather
    than taken in order so that a cap still spans many packages. The sample depends on what is
    installed, so runs on two machines compare only with the same packages (the cache key, a hash
    of the documents, tells).
    """
    paths = sysconfig.get_paths()
    candidates = (paths["purelib"], paths["platlib"], *site.getsitepackages())
    roots = {Path(p).resolve() for p in candidates if Path(p).is_dir()}
    files = sorted({f.resolve() for root in roots for f in root.rglob("*.py") if f.is_file()})
    picked, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(files)):
        size = files[i].stat().st_size
        if size and total + size <= max_bytes:
            picked.append(files[i])
            total += size
    return sorted(picked)


def _decode_text(path: Path, raw: bytes) -> str:
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"--data: {path} looks binary (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"--data: {path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason})"
        ) from None


def _read_jsonl(path: Path, raw: bytes, key: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_decode_text(path, raw).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"--data: {path}:{lineno} is not valid JSON: {e.msg} at column {e.colno}"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
            got = f"keys {sorted(obj)}" if isinstance(obj, dict) else type(obj).__name__
            raise DataError(
                f"--data: {path}:{lineno}: expected an object with a string field {key!r}, got {got}"
            )
        docs.append(Document(f"{path}:{lineno}", obj[key]))
    return docs


def _expand(arg: str) -> list[Path]:
    path = Path(arg)
    if not path.exists():
        raise DataError(f"--data: path {arg!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"--data: folder {arg!r} contains no {' or '.join(TEXT_SUFFIXES)} files")
        return files
    return [path]


def _pieces(doc: Document, doc_chars: int) -> list[Document]:
    """Cut a long document at line boundaries into pieces of at most ~doc_chars characters."""
    if len(doc.text) <= doc_chars:
        return [doc]
    out, start = [], 0
    while start < len(doc.text):
        end = min(start + doc_chars, len(doc.text))
        if end < len(doc.text):
            nl = doc.text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end  # a single line longer than doc_chars is cut mid-line
        out.append(Document(f"{doc.name}#{len(out)}", doc.text[start:end]))
        start = end
    return out


def read_documents(
    data: list[str] | None, doc_chars: int = 100_000, jsonl_key: str = "text", corpus: str = "stdlib",
    corpus_bytes: int = 32 << 20, seed: int = 0,
) -> list[Document]:
    """Read and check every input; raises DataError naming the file (and line) on bad input.
    Without `data`, the default corpus: "stdlib" or "site-packages" (corpus_bytes of it, from seed)."""
    if data:
        files = [f for arg in data for f in _expand(arg)]
        docs = []
        for f in files:
            raw = f.read_bytes()
            if f.suffix == ".jsonl":
                docs += _read_jsonl(f, raw, jsonl_key)
            else:
                docs.append(Document(str(f), _decode_text(f, raw)))
        what = f"--data {' '.join(data)}"
    else:
        if corpus not in ("stdlib", "site-packages"):
            raise ValueError(f"corpus must be 'stdlib' or 'site-packages', got {corpus!r}")
        docs = []
        files = stdlib_files() if corpus == "stdlib" else site_packages_files(corpus_bytes, seed)
        for f in files:
            try:
                docs.append(Document(str(f), f.read_text(encoding="utf-8")))
            except UnicodeDecodeError:
                pass  # a handful of source files (test fixtures) are deliberately in other encodings
        what = (f"the standard library at {sysconfig.get_paths()['stdlib']}" if corpus == "stdlib"
                else "the installed packages' sources (site-packages)")
    docs = [p for d in docs if d.text.strip() for p in _pieces(d, doc_chars)]
    if not docs:
        raise DataError(f"--data: no non-empty documents found in {what}")
    return docs


# ---------------------------------------------------------------------------------------------
# 2. Train / validation split
# ---------------------------------------------------------------------------------------------


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """A seeded permutation of the documents; the first ceil(val_fraction * n) are validation."""
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise DataError(f"--data: need at least 2 documents to split train/validation, got {len(docs)}")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, math.ceil(val_fraction * len(docs))))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


# ---------------------------------------------------------------------------------------------
# 3. Tokenizer
# ---------------------------------------------------------------------------------------------


def new_tokenizer() -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every string round-trips exactly, no unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 257:
        raise DataError(f"--vocab-size must be at least 257 (256 bytes and {EOT}), got {vocab_size}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return _specials_as_text(tok)


def _specials_as_text(tok: Tokenizer) -> Tokenizer:
    """A document that contains the string "<|endoftext|>" (a tokenizer's source, say) is encoded
    as the text it is; by default tokenizers would turn it into the separator, and decode would
    drop it. The setting is not stored in tokenizer.json, so every load sets it again."""
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--tokenizer: file {str(path)!r} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"--tokenizer: {path} is not a tokenizers JSON file: {e}") from None
    if tok.token_to_id(EOT) is None:
        raise DataError(f"--tokenizer: {path} has no {EOT!r} token, which separates documents")
    return _specials_as_text(tok)


# ---------------------------------------------------------------------------------------------
# 4. Tokenize once, cache
# ---------------------------------------------------------------------------------------------


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little") + b)  # length-prefixed: ("ab","c") != ("a","bc")
    return h.hexdigest()[:16]


def _docs_hash(docs: list[Document]) -> str:
    return _sha(*(d.text for d in docs))


def _encode(tok: Tokenizer, docs: list[Document], eot: int) -> np.ndarray:
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
    parts = []
    for i in range(0, len(docs), 256):  # bounded batches keep peak memory to a few MB of Encodings
        for enc in tok.encode_batch([d.text for d in docs[i : i + 256]], add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=dtype))
            parts.append(np.asarray([eot], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _save_npy(path: str, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save(str) would append ".npy" to the name
        np.save(f, arr)


@dataclass
class TokenData:
    train: np.ndarray  # flat token stream of the training split, documents separated by EOT
    val: np.ndarray  # same for validation
    tokenizer: Tokenizer
    key: str  # hash of (documents, split, tokenizer): a resumed run checks it is unchanged
    n_train_docs: int
    n_val_docs: int


def prepare(
    data: list[str] | None,
    *,
    cache_dir: str | os.PathLike,
    vocab_size: int,
    tokenizer: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    doc_chars: int = 100_000,
    jsonl_key: str = "text",
    corpus: str = "stdlib",
    corpus_bytes: int = 32 << 20,
    log=print,
) -> TokenData:
    """Documents -> split -> tokenizer -> cached token streams (see the module docstring)."""
    docs = read_documents(data, doc_chars, jsonl_key, corpus, corpus_bytes, seed)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    cache = Path(cache_dir)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        tok_path = cache / f"tokenizer-{_sha(_docs_hash(train_docs), str(vocab_size), EOT)}.json"
        if tok_path.is_file():
            tok = load_tokenizer(tok_path)
        else:
            n_chars = sum(len(d.text) for d in train_docs)
            log(f"training a {vocab_size}-token byte-level BPE on {len(train_docs)} documents "
                f"({n_chars / 1e6:.1f}M characters)")
            tok = train_tokenizer([d.text for d in train_docs], vocab_size)
            atomic_write_bytes(tok_path, tok.to_str().encode())
    eot = tok.token_to_id(EOT)
    key = _sha(CACHE_FORMAT, _docs_hash(train_docs), _docs_hash(val_docs), tok.to_str())
    streams = {}
    for name, split in (("train", train_docs), ("val", val_docs)):
        path = cache / f"tokens-{key}-{name}.npy"
        if path.is_file():
            streams[name] = np.load(path, mmap_mode="r")  # shared through the page cache across ranks
        else:
            log(f"tokenizing the {name} split ({len(split)} documents)")
            arr = _encode(tok, split, eot)
            # Atomic, so that a run killed here, or a second rank reading, never sees half a file.
            atomic_write(path, lambda tmp, arr=arr: _save_npy(tmp, arr))
            streams[name] = arr
    return TokenData(streams["train"], streams["val"], tok, key, len(train_docs), len(val_docs))


# ---------------------------------------------------------------------------------------------
# 5. Packed sequences and batches
# ---------------------------------------------------------------------------------------------


def pack(stream: np.ndarray, seq_len: int, split: str) -> np.ndarray:
    """Non-overlapping [N, seq_len] windows of the stream; the tail shorter than one is dropped."""
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(
            f"the {split} split has {len(stream)} tokens, fewer than one sequence of --seq-len {seq_len}; "
            f"give more data, a larger --val-fraction or a smaller --seq-len"
        )
    return np.asarray(stream[: n * seq_len]).reshape(n, seq_len)


class PackedBatches:
    """Global batch `step` = sequences [step*B, (step+1)*B) of an endless, per-epoch shuffled order.

    A pure function of (seed, step), so resuming needs only the step, and every rank computes the
    same global batch and takes its own contiguous rows of it.
    """

    def __init__(self, seqs: np.ndarray, batch_size: int, seed: int):
        self.seqs, self.batch_size, self.seed = seqs, batch_size, seed
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))
        return self._perm

    def global_batch(self, step: int) -> np.ndarray:
        n = len(self.seqs)
        idx = []
        for sample in range(step * self.batch_size, (step + 1) * self.batch_size):
            idx.append(self._order(sample // n)[sample % n])
        return self.seqs[np.asarray(idx)]  # [B, T]

    def epochs(self, step: int) -> float:
        return step * self.batch_size / len(self.seqs)


def shard(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's contiguous rows of a global batch (the batch size divides evenly, checked upstream)."""
    per = len(batch) // world_size
    return batch[rank * per : (rank + 1) * per]


# ---------------------------------------------------------------------------------------------
# Baseline
# ---------------------------------------------------------------------------------------------


def unigram_perplexity(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Perplexity of `targets` under training-split token frequencies with add-one smoothing.

    What a model that ignores context entirely would score: the bar a language model must clear.
    """
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(np.exp(-logp[np.asarray(targets, dtype=np.int64)].mean()))
