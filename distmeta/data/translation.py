"""X→English translation tasks (meta-learning for low-resource NMT, Gu et al. 2018).

Sentence pairs come from any Parquet file with columns ``src_lang, tgt_lang, split, src,
tgt`` (or from line-aligned plain-text files). Text goes through Moses punctuation
normalisation and tokenisation, then one sentencepiece model shared by all languages, which
is trained on training-split text only (never a dev or test sentence). The encoded pairs are
written once as an Arrow IPC file that every worker memory-maps. A task is one source
language; its support and query sets are token-budgeted batches of that language's pairs,
drawn by the same counter-based rule as every other sampler.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from distmeta.data.omniglot import DataError
from distmeta.data.sampling import task_rng
from distmeta.types import TaskBatch

REQUIRED_COLUMNS = ("src_lang", "tgt_lang", "split", "src", "tgt")
STORE_VERSION = 2  # in the cache key: raised when what is stored changes (2: blank pairs are dropped)
DATA_SPLIT = {"train": "train", "val": "dev", "test": "test"}  # sampler split -> the data's split name
PAD, UNK, BOS, EOS = 0, 1, 2, 3
log = logging.getLogger("distmeta.data")
MOSES_LANGUAGE = {"eng": "en", "deu": "de", "fra": "fr", "spa": "es", "ita": "it", "por": "pt", "nld": "nl",
                  "ces": "cs", "pol": "pl", "ron": "ro", "fin": "fi", "hun": "hu", "ell": "el", "lav": "lv",
                  "lit": "lt", "est": "et", "slv": "sl", "isl": "is", "swe": "sv", "dan": "da", "cat": "ca"}


def read_pairs(path: str | Path, languages: Sequence[str] | None = None,
               splits: Sequence[str] | None = None) -> pa.Table:
    """The pairs of a Parquet file, optionally only some source languages and splits.

    Raises:
        DataError: no such file, not Parquet, or a required column missing (named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no translation data at {path}; expected a Parquet file with columns "
                        f"{', '.join(REQUIRED_COLUMNS)}")
    try:
        schema = pq.read_schema(path)
    except pa.ArrowException as error:
        raise DataError(f"{path} is not a readable Parquet file: {error}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; translation data needs "
                        f"{', '.join(REQUIRED_COLUMNS)} (has {', '.join(schema.names)})")
    filters = [("src_lang", "in", list(languages))] if languages else []
    filters += [("split", "in", list(splits))] if splits else []
    table = pq.read_table(path, columns=list(REQUIRED_COLUMNS), filters=filters or None)
    if languages:
        absent = sorted(set(languages) - set(table.column("src_lang").unique().to_pylist()))
        if absent:
            raise DataError(f"{path} has no pairs for language(s) {', '.join(absent)}")
    return table


def read_parallel_text(src_path: str | Path, tgt_path: str | Path, src_lang: str, split: str,
                       tgt_lang: str = "eng") -> pa.Table:
    """Pairs from two line-aligned plain-text files, as a table like ``read_pairs``'.

    Raises:
        DataError: a file is missing or the two have different line counts.
    """
    lines = []
    for path in (Path(src_path), Path(tgt_path)):
        if not path.is_file():
            raise DataError(f"no parallel text file {path}")
        lines.append(path.read_text(encoding="utf-8").splitlines())
    if len(lines[0]) != len(lines[1]):
        raise DataError(f"{src_path} has {len(lines[0])} lines but {tgt_path} has {len(lines[1])}; "
                        "parallel files must be line-aligned")
    n = len(lines[0])
    return pa.table({"src_lang": [src_lang] * n, "tgt_lang": [tgt_lang] * n, "split": [split] * n,
                     "src": lines[0], "tgt": lines[1]})


@dataclass(frozen=True)
class ParallelText:
    """Two line-aligned plain-text files: ``src_lang`` sentences and their ``tgt_lang``
    translations, all of one split."""

    src: str
    tgt: str
    src_lang: str
    split: str
    tgt_lang: str = "eng"


def read_source(source: str | Path | Sequence[ParallelText], languages: Sequence[str] | None = None,
                splits: Sequence[str] | None = None) -> pa.Table:
    """The pairs of a Parquet file (``read_pairs``) or of plain-text files, in file order,
    optionally only some source languages and splits.

    Raises:
        DataError: unreadable data, or no pairs for a language asked for.
    """
    if isinstance(source, (str, Path)):
        return _usable_pairs(read_pairs(source, languages, splits), str(source), languages)
    files = [f for f in source if (not languages or f.src_lang in languages) and (not splits or f.split in splits)]
    absent = sorted(set(languages or ()) - {f.src_lang for f in files})
    if absent:
        raise DataError(f"the parallel text files have no pairs for language(s) {', '.join(absent)}")
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in REQUIRED_COLUMNS})
    table = pa.concat_tables([read_parallel_text(f.src, f.tgt, f.src_lang, f.split, f.tgt_lang) for f in files])
    return _usable_pairs(table, "the parallel text files", languages)


def _usable_pairs(table: pa.Table, source: str, languages: Sequence[str] | None) -> pa.Table:
    """Refuse columns that would train on wrong text (numbers, or nulls that would read as
    "None"); drop, with a warning, pairs whose source or target is blank, which teach nothing.

    Raises:
        DataError: a column that is not text or has missing values, or a language asked for
            whose pairs are all blank.
    """
    for name in REQUIRED_COLUMNS:
        column = table.column(name)
        text_type = column.type.value_type if pa.types.is_dictionary(column.type) else column.type  # pandas category
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
                or pa.types.is_string_view(text_type)):
            raise DataError(f"{source}: column {name} holds {column.type}, not text")
        if column.type != pa.string():
            table = table.set_column(table.schema.get_field_index(name), name, column.cast(pa.string()))
            column = table.column(name)
        if column.null_count:
            raise DataError(f"{source}: column {name} has {column.null_count} missing value(s)")
    blank = pc.or_(pc.equal(pc.utf8_trim_whitespace(table.column("src")), ""),
                   pc.equal(pc.utf8_trim_whitespace(table.column("tgt")), ""))
    count = pc.sum(blank).as_py() or 0
    if count:
        log.warning("%s: %d pair(s) with a blank source or target dropped", source, count)
        table = table.filter(pc.invert(blank))
        absent = sorted(set(languages or ()) - set(table.column("src_lang").unique().to_pylist()))
        if absent:
            raise DataError(f"{source} has only blank pairs for language(s) {', '.join(absent)}")
    return table


def source_digest(source: str | Path | Sequence[ParallelText]) -> str:
    """sha256 of the data's content (and, for plain text, of what each file holds), so caches
    follow the data wherever it is copied.

    Raises:
        DataError: a file is missing.
    """
    digest = hashlib.sha256()
    entries = [(Path(source), "")] if isinstance(source, (str, Path)) else \
        [(Path(p), f"{f.src_lang}|{f.tgt_lang}|{f.split}|{side}") for f in source for side, p in (("src", f.src), ("tgt", f.tgt))]
    for path, meaning in entries:
        if not path.is_file():
            raise DataError(f"no translation data at {path}")
        with path.open("rb") as handle:
            digest.update(f"{meaning}:{hashlib.file_digest(handle, 'sha256').hexdigest()};".encode())
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _moses(lang: str):
    from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer

    code = MOSES_LANGUAGE.get(lang, "en")  # Moses' rules are per language; English's are a safe default
    return MosesPunctNormalizer(lang=code), MosesTokenizer(lang=code), MosesDetokenizer(lang=code)


def pretokenize(text: str, lang: str) -> str:
    """Moses punctuation normalisation and tokenisation (no HTML escaping)."""
    normalizer, tokenizer, _ = _moses(lang)
    return " ".join(tokenizer.tokenize(normalizer.normalize(text), escape=False))


def detokenize(text: str, lang: str) -> str:
    """Undo ``pretokenize``'s splitting, for scoring on plain text."""
    return _moses(lang)[2].detokenize(text.split())


@dataclass(eq=False)
class TextPipeline:
    """Moses pre-tokenisation, then the shared sentencepiece model (ids 0–3: pad, unk, bos, eos;
    characters outside its vocabulary fall back to bytes, so decoding is lossless)."""

    model_file: Path
    processor: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import sentencepiece as spm

        self.processor = spm.SentencePieceProcessor(model_file=str(self.model_file))

    @classmethod
    def train(cls, table: pa.Table, model_file: str | Path, vocab_size: int) -> "TextPipeline":
        """Train the shared model on both sides of ``table``'s pairs (all of them, in order, so
        the same table gives the same model).

        Raises:
            DataError: ``table`` holds dev or test pairs (the model must never see them).
        """
        import sentencepiece as spm

        held_out = sorted(set(table.column("split").to_pylist()) - {"train"})
        if held_out:
            raise DataError(f"the sentencepiece model is trained on training pairs only, got split(s) {held_out}")
        model_file = Path(model_file)
        model_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt") as corpus:
            for lang, src, tgt_lang, tgt in zip(*(table.column(c).to_pylist()
                                                  for c in ("src_lang", "src", "tgt_lang", "tgt"))):
                corpus.write(pretokenize(src, lang) + "\n" + pretokenize(tgt, tgt_lang) + "\n")
            corpus.flush()
            spm.SentencePieceTrainer.train(
                input=corpus.name, model_prefix=str(model_file.with_suffix("")), vocab_size=vocab_size,
                model_type="unigram", character_coverage=0.9995, byte_fallback=True, pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
                input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
        return cls(model_file.with_suffix(".model"))

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str, lang: str) -> list[int]:
        return self.processor.encode(pretokenize(text, lang))

    def decode(self, ids: Sequence[int], lang: str = "eng") -> str:
        """Ids (stopping at the first eos, skipping pads and bos) back to plain text."""
        ids = list(ids)
        ids = ids[:ids.index(EOS)] if EOS in ids else ids
        return detokenize(self.processor.decode([i for i in ids if i not in (PAD, BOS)]), lang)


def encode_store(table: pa.Table, pipeline: TextPipeline, path: str | Path) -> Path:
    """Encode every pair once into an Arrow IPC file (``src_lang, split, src_ids, tgt_ids``)
    that samplers memory-map, so workers share the pages instead of copying the corpus."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    langs, tgt_langs = table.column("src_lang").to_pylist(), table.column("tgt_lang").to_pylist()
    src = [pipeline.encode(t, lang) for t, lang in zip(table.column("src").to_pylist(), langs)]
    tgt = [pipeline.encode(t, lang) for t, lang in zip(table.column("tgt").to_pylist(), tgt_langs)]
    encoded = pa.table({"src_lang": table.column("src_lang"), "split": table.column("split"),
                        "src_ids": pa.array(src, pa.list_(pa.int32())), "tgt_ids": pa.array(tgt, pa.list_(pa.int32()))})
    temporary = path.with_suffix(".tmp")
    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, encoded.schema) as writer:
        writer.write_table(encoded)
    temporary.replace(path)
    return path


def prepare_translation(source: str | Path | Sequence[ParallelText], languages: Sequence[str], vocab_size: int,
                        cache_dir: Path) -> tuple[TextPipeline, Path]:
    """The shared tokeniser (trained on these languages' training pairs) and the encoded store,
    built once and cached under a key of the data file's content (so a copy elsewhere, on
    another machine, finds it too), the languages and the vocabulary size. Built in a private
    folder and renamed into place, so processes racing to build it never see a half-written one.

    Raises:
        DataError: the data cannot be read (see ``read_source``).
    """
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        read_pairs(source)  # the clear error
    key = hashlib.sha1(f"{source_digest(source)}|{sorted(languages)}|{vocab_size}|{STORE_VERSION}".encode())
    folder = cache_dir / "translation" / key.hexdigest()[:16]
    if folder.exists() and not _usable_cache(folder):
        _discard(folder)
    if not (folder / "pairs.arrow").exists():
        pairs = read_source(source, languages)
        folder.parent.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(dir=folder.parent))
        train = pairs.filter(pc.equal(pairs.column("split"), "train"))
        pipeline = TextPipeline.train(train, private / "spm.model", vocab_size)
        encode_store(pairs, pipeline, private / "pairs.arrow")
        try:
            os.replace(private, folder)
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(private, ignore_errors=True)
    return TextPipeline(folder / "spm.model"), folder / "pairs.arrow"


def _usable_cache(folder: Path) -> bool:
    """Whether a cached tokeniser and store read back (a crash or a full disk can leave them
    empty or cut); says why not."""
    try:
        TextPipeline(folder / "spm.model")
        open_store(folder / "pairs.arrow")
        return True
    except (OSError, RuntimeError, pa.ArrowException) as error:
        log.warning("translation cache %s is unusable (%s); rebuilding it", folder, str(error).splitlines()[0])
        return False


def _discard(folder: Path) -> None:
    """Remove a cache folder: renamed aside first (atomic), so a process building its own copy
    never meets a half-deleted one."""
    aside = folder.with_name(f"{folder.name}.discarded-{uuid.uuid4().hex[:12]}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:  # another process moved it first
        return
    except OSError as error:
        raise DataError(f"translation cache {folder} is unusable and cannot be removed ({error}); delete it") from None
    shutil.rmtree(aside, ignore_errors=True)


def open_store(path: str | Path) -> pa.Table:
    """The encoded pairs, memory-mapped (zero-copy)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


class _Ragged:
    """One list<int32> column as (offsets, values) numpy views, for cheap row slicing."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        array = column.combine_chunks()
        self.offsets, self.values = array.offsets.to_numpy(), array.values.to_numpy()

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


class TranslationTasks:
    """Task ``index`` of meta-step ``step``: a source language drawn uniformly from
    ``languages``, a support set of pairs filling ``support_tokens`` target tokens and a
    disjoint query set filling ``query_tokens``, all from the split's pairs of that language.

    A batch of tasks is padded to common sizes: source ids (T, B, S) and target ids
    (T, B, L) with bos/eos around each target; a padded sentence is all ``PAD``.
    """

    def __init__(self, store: pa.Table, languages: Sequence[str], support_tokens: int, query_tokens: int,
                 max_len: int = 64, seed: int = 0) -> None:
        """Raises:
            DataError: a language without pairs in some split, or whose sentences cannot fill
                a support and a query set.
        """
        self.languages, self.seed, self.max_len = tuple(languages), seed, max_len
        self.support_tokens, self.query_tokens = support_tokens, query_tokens
        self.src, self.tgt = _Ragged(store.column("src_ids")), _Ragged(store.column("tgt_ids"))
        self.by_language: dict[tuple[str, str], np.ndarray] = {}
        for lang in self.languages:
            for split in DATA_SPLIT.values():
                mask = pc.and_(pc.equal(store.column("src_lang"), lang), pc.equal(store.column("split"), split))
                rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
                if len(rows) < 2:
                    raise DataError(f"language {lang!r} has {len(rows)} pair(s) in split {split!r}; a task "
                                    "needs a support and a query set")
                self.by_language[lang, split] = rows

    def take_tokens(self, rows: np.ndarray, budget: int) -> tuple[list[int], np.ndarray]:
        """The leading rows whose target tokens (with bos/eos) fit ``budget`` (at least one),
        and the rows after them: the one rule of every token budget (tasks, batches, fine-tuning sets)."""
        taken, used = [], 0
        for position, row in enumerate(rows):
            cost = self.target_cost(row)
            if taken and used + cost > budget:
                return taken, rows[position:]
            taken.append(int(row))
            used += cost
        return taken, rows[len(taken):]

    def rows(self, lang: str, split: str) -> np.ndarray:
        """Store rows of ``lang``'s pairs in ``split`` (train, val or test), in file order."""
        return self.by_language[lang, DATA_SPLIT[split]]

    def budget_rows(self, lang: str, tokens: int | None, seed: int) -> np.ndarray:
        """A fine-tuning set: ``lang``'s training pairs in a fixed shuffled order, cut where
        their target tokens (with bos/eos) reach ``tokens`` (None: all of them). The order
        depends on ``seed`` alone, so smaller budgets are prefixes of larger ones and every
        initialisation fine-tunes on the same pairs."""
        order = np.random.default_rng([seed, 7919]).permutation(self.by_language[lang, "train"])
        return order if tokens is None else order[:len(self.take_tokens(order, tokens)[0])]

    def target_tokens(self, rows: np.ndarray) -> int:
        """Target tokens of ``rows`` as the model sees them (cut to max_len, with bos/eos)."""
        return int(sum(self.target_cost(r) for r in rows))

    def target_cost(self, row: int) -> int:
        """Target tokens of one pair as the model sees it: cut to max_len, with bos and eos."""
        return min(len(self.tgt.row(row)), self.max_len) + 2

    def sources_cut(self, rows: Sequence[int]) -> int:
        """How many of ``rows`` have a source longer than max_len pieces (the model sees it cut)."""
        return sum(len(self.src.row(r)) > self.max_len for r in rows)

    def batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs ``rows`` as one padded batch: source ids (B, S), target ids (B, L)."""
        src, tgt = self._pad([list(rows)])
        return src[0], tgt[0]

    def sample(self, split: str, step: int, start: int, stop: int) -> TaskBatch:
        tasks = []
        for index in range(start, stop):
            rng = task_rng(self.seed, split, step, index)
            lang = self.languages[rng.integers(len(self.languages))]
            order = rng.permutation(self.by_language[lang, DATA_SPLIT[split]])
            support, rest = self.take_tokens(order[:-1], self.support_tokens)  # the last row is kept for the query
            query, _ = self.take_tokens(np.concatenate([rest, order[-1:]]), self.query_tokens)
            tasks.append((support, query))
        return TaskBatch(self._pad([s for s, _ in tasks]), self._pad([q for _, q in tasks]))

    def _pad(self, tasks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(rows) for rows in tasks)
        src_len = max(min(len(self.src.row(r)), self.max_len) for rows in tasks for r in rows)
        tgt_len = max(min(len(self.tgt.row(r)), self.max_len) for rows in tasks for r in rows) + 2
        src = torch.full((len(tasks), width, src_len), PAD, dtype=torch.long)
        tgt = torch.full((len(tasks), width, tgt_len), PAD, dtype=torch.long)
        for t, rows in enumerate(tasks):
            for b, row in enumerate(rows):
                source, target = self.src.row(row)[:self.max_len], self.tgt.row(row)[:self.max_len]
                src[t, b, :len(source)] = torch.from_numpy(source.astype(np.int64))
                tgt[t, b, :len(target) + 2] = torch.tensor([BOS, *target.tolist(), EOS])
        return src, tgt
