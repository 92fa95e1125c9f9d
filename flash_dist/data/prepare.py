"""``flash-dist prepare INPUT... --out DIR``: text files -> GPT-2 tokens in uint16 memmap shards.

Layout of ``DIR``:

* ``train_000000.bin``, ``train_000001.bin``, ..., ``val_000000.bin``, ...: raw little-endian
  uint16 token ids (GPT-2's 50257 ids fit), at most ``--shard-tokens`` each, read with
  ``numpy.memmap``;
* ``meta.json``: tokenizer, vocabulary size, EOS id, and per split its shards, token and document
  counts. Written last: a directory without it is incomplete.

Every document is preceded by ``<|endoftext|>`` (id 50256), so the stream reads
``EOS doc1 EOS doc2 ...``: documents are joined by EOS as in GPT-2's training data, and each one
starts with the same token, which is where :class:`~flash_dist.data.dataset.TokenDataset` puts
document boundaries for packed training.

A document is a whole input file, or, with ``--doc-separator``, each non-empty piece of a file
split at that string. Directories are searched recursively for ``*.txt``. Every ``k``-th document
(``k = round(1 / val_fraction)``, starting from ``seed mod k``) goes to the validation split, so
the split is deterministic, needs one pass, and never cuts a document in two.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from flash_dist.data.tokenizer import EOS_TOKEN_ID, VOCAB_SIZE, encode

__all__ = ["FORMAT", "add_arguments", "main", "prepare", "run"]

FORMAT = "flash-dist-tokens/1"
SPLITS = ("train", "val")
_TOKENIZE_BATCH = 256  # documents per call of the (multi-threaded) fast tokenizer


def _input_files(inputs: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"prepare: directory {path} contains no *.txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"prepare: input {path} is neither a file nor a directory")
    return files


def _documents(files: Sequence[Path], doc_separator: str | None, builtin_corpus: bool) -> Iterator[str]:
    for file in files:
        text = file.read_text(encoding="utf-8")
        pieces = text.split(doc_separator) if doc_separator else [text]
        for piece in pieces:
            if piece.strip():
                yield piece.strip("\n")
    if builtin_corpus:
        from flash_dist.data.corpus import generate_corpus

        yield from generate_corpus()


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Appends tokens to ``{split}_{k:06d}.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, out: Path, split: str, shard_tokens: int) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.astype("<u2", copy=False).tobytes())
            self.shards[-1]["tokens"] += len(part)

    def _open(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict:
        if self._file is not None:
            self._file.close()
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, *, val_fraction: float = 0.01, seed: int = 0,
            shard_tokens: int = 100_000_000, doc_separator: str | None = None, builtin_corpus: bool = False,
            overwrite: bool = False) -> dict:
    """Tokenize ``inputs`` into ``out_dir`` (layout in the module docstring); returns ``meta.json``'s content.

    Args:
        inputs: text files and directories (searched for ``*.txt``).
        val_fraction: share of documents for the validation split, in ``(0, 0.5]``.
        seed: picks which documents go to validation.
        shard_tokens: tokens per shard file at most.
        doc_separator: split each file into documents at this string (default: one per file).
        builtin_corpus: also include :func:`flash_dist.data.corpus.generate_corpus`'s documents.
        overwrite: replace an existing prepared directory instead of refusing.
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"prepare: val_fraction must be in (0, 0.5], got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"prepare: shard_tokens must be >= 1, got {shard_tokens}")
    if doc_separator == "":
        raise ValueError("prepare: doc_separator must not be empty")
    files = _input_files(inputs)
    if not files and not builtin_corpus:
        raise ValueError("prepare: no inputs: give text files or directories, or use the built-in corpus")
    out = Path(out_dir)
    old = ([out / "meta.json"] if (out / "meta.json").exists() else []) + sorted(out.glob("*_[0-9]*.bin"))
    if old and not overwrite:
        raise FileExistsError(f"prepare: {out} already holds prepared data ({old[0].name}); pass overwrite=True "
                              "(--overwrite) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    for path in old:
        path.unlink()

    every = max(1, round(1.0 / val_fraction))
    first_val = seed % every
    writers = {split: _ShardWriter(out, split, shard_tokens) for split in SPLITS}
    index = 0
    for batch in _batches(_documents(files, doc_separator, builtin_corpus), _TOKENIZE_BATCH):
        for ids in encode(batch):
            split = "val" if index % every == first_val else "train"
            tokens = np.empty(len(ids) + 1, dtype=np.uint16)
            tokens[0] = EOS_TOKEN_ID
            tokens[1:] = ids
            writers[split].write(tokens)
            writers[split].documents += 1
            index += 1
    splits = {split: w.close() for split, w in writers.items()}
    for split in SPLITS:
        if splits[split]["documents"] == 0:
            raise ValueError(f"prepare: the {split} split is empty ({index} documents with val_fraction="
                             f"{val_fraction} puts every {every}th into val); give more documents, use "
                             "--doc-separator, or change --val-fraction")
    meta = {"format": FORMAT, "tokenizer": "gpt2", "vocab_size": VOCAB_SIZE, "eos_token_id": EOS_TOKEN_ID,
            "dtype": "uint16", "document_start": "eos", "val_fraction": val_fraction, "seed": seed,
            "sources": [str(f) for f in files] + (["builtin:corpus"] if builtin_corpus else []),
            "splits": splits}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``prepare`` command's arguments, for a ``flash-dist`` subcommand parser."""
    parser.add_argument("inputs", nargs="*", type=Path, metavar="INPUT",
                        help="text files, or directories searched for *.txt")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of documents for validation (default: 0.01)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the validation documents (default: 0)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000,
                        help="tokens per shard file at most (default: 100M = 200 MB)")
    parser.add_argument("--doc-separator", default=None,
                        help=r"split files into documents at this string; the escapes \n \t \r \\ are "
                             "understood (default: one document per file)")
    parser.add_argument("--builtin-corpus", action="store_true",
                        help="add the built-in generated corpus (~340 KB of English-like text)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing prepared data in --out")


def _unescape(text: str) -> str:
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: escapes[m.group(1)], text)


def run(args: argparse.Namespace) -> dict:
    """Run ``prepare`` from parsed :func:`add_arguments` arguments; prints a summary."""
    sep = _unescape(args.doc_separator) if args.doc_separator else None
    meta = prepare(args.inputs, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   shard_tokens=args.shard_tokens, doc_separator=sep, builtin_corpus=args.builtin_corpus,
                   overwrite=args.overwrite)
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens in {len(info['shards'])} "
              f"shard(s)")
    print(f"wrote {args.out / 'meta.json'}")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flash-dist prepare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
