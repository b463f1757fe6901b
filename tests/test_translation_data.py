"""Translation task data on the real Tatoeba pairs: reading and its errors, the text pipeline,
the memory-mapped store and the counter-based language tasks."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distmeta.components import build_sampler, translation_source
from distmeta.config import ConfigError, load_job
from distmeta.data.omniglot import DataError
from distmeta.data.translation import (
    BOS,
    EOS,
    PAD,
    ParallelText,
    TextPipeline,
    TranslationTasks,
    detokenize,
    encode_store,
    open_store,
    prepare_translation,
    pretokenize,
    read_pairs,
    read_parallel_text,
    read_source,
    source_digest,
)

TATOEBA = Path(__file__).resolve().parents[2] / "shared" / "data" / "translation" / "tatoeba_x2en.parquet"
JOBS = Path(__file__).resolve().parents[1] / "jobs"
LANGS = ("deu", "fra", "ron")

pytestmark = pytest.mark.skipif(not TATOEBA.is_file(), reason=f"real translation data not found at {TATOEBA}")


@pytest.fixture(scope="module")
def pairs() -> pa.Table:
    return read_pairs(TATOEBA, LANGS)


@pytest.fixture(scope="module")
def pipeline(pairs, tmp_path_factory) -> TextPipeline:
    train = pairs.filter(pa.compute.equal(pairs.column("split"), "train")).slice(0, 6000)
    return TextPipeline.train(train, tmp_path_factory.mktemp("spm") / "shared.model", vocab_size=2000)


@pytest.fixture(scope="module")
def store_file(pairs, pipeline, tmp_path_factory) -> Path:
    """300 pairs per language and split, encoded."""
    small = pa.concat_tables([pairs.filter(pa.compute.and_(pa.compute.equal(pairs.column("src_lang"), lang),
                                                           pa.compute.equal(pairs.column("split"), split))).slice(0, 300)
                              for lang in LANGS for split in ("train", "dev", "test")])
    return encode_store(small, pipeline, tmp_path_factory.mktemp("store") / "pairs.arrow")


@pytest.fixture(scope="module")
def tasks(store_file) -> TranslationTasks:
    return TranslationTasks(open_store(store_file), LANGS, support_tokens=120, query_tokens=80, max_len=40, seed=3)


def test_read_pairs_filters_languages_and_splits(pairs):
    assert set(pairs.column("src_lang").unique().to_pylist()) == set(LANGS)
    assert set(pairs.column("tgt_lang").unique().to_pylist()) == {"eng"}
    dev = read_pairs(TATOEBA, ["ron"], ["dev"])
    assert dev.num_rows == 500 and set(dev.column("split").to_pylist()) == {"dev"}


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no translation data at"):
        read_pairs(tmp_path / "missing.parquet")
    pq.write_table(pa.table({"src_lang": ["deu"], "src": ["Hallo"]}), tmp_path / "thin.parquet")
    with pytest.raises(DataError, match="lacks column\\(s\\) tgt_lang, split, tgt"):
        read_pairs(tmp_path / "thin.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_pairs(tmp_path / "junk.parquet")
    with pytest.raises(DataError, match="no pairs for language\\(s\\) xxx"):
        read_pairs(TATOEBA, ["deu", "xxx"])
    (tmp_path / "a.txt").write_text("eins\nzwei\n")
    (tmp_path / "b.txt").write_text("one\n")
    with pytest.raises(DataError, match="has 2 lines but .* has 1"):
        read_parallel_text(tmp_path / "a.txt", tmp_path / "b.txt", "deu", "train")


def test_text_that_is_not_text_is_refused_and_blank_pairs_are_dropped(tmp_path, caplog):
    def write(name, src, tgt, lang=("deu", "deu", "fra")):
        table = pa.table({"src_lang": list(lang), "tgt_lang": ["eng"] * 3, "split": ["train"] * 3,
                          "src": src, "tgt": tgt})
        pq.write_table(table, tmp_path / name)
        return tmp_path / name
    with pytest.raises(DataError, match="column src has 1 missing value"):  # would be read as the text "None"
        read_source(write("null.parquet", ["Hallo", None, "Salut"], ["Hello", "Hi", "Hi"]))
    with pytest.raises(DataError, match="column tgt holds int64, not text"):
        read_source(write("ints.parquet", ["Hallo", "Du", "Salut"], [0, 1, 2]))
    blank = write("blank.parquet", ["Hallo", " ", "Salut"], ["Hello", "You", ""])
    table = read_source(blank, ["deu"])
    assert table.column("src").to_pylist() == ["Hallo"] and "1 pair(s) with a blank source or target dropped" in caplog.text
    with pytest.raises(DataError, match="only blank pairs for language\\(s\\) fra"):
        read_source(blank, ["deu", "fra"])
    categorical = pa.table({"src_lang": pa.array(["deu", "fra"]).dictionary_encode(),  # how pandas writes category
                            "tgt_lang": ["eng", "eng"], "split": pa.array(["train", "train"]).dictionary_encode(),
                            "src": ["Hallo", "Salut"], "tgt": ["Hello", "Hi"]})
    pq.write_table(categorical, tmp_path / "categorical.parquet")
    assert read_source(tmp_path / "categorical.parquet", ["fra"]).column("src_lang").to_pylist() == ["fra"]
    (tmp_path / "a.txt").write_text("eins\n\n")
    (tmp_path / "b.txt").write_text("one\ntwo\n")
    files = [ParallelText(str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "deu", "train")]
    assert read_source(files).column("tgt").to_pylist() == ["one"]

def test_plain_text_pairs_read_like_parquet(tmp_path):
    (tmp_path / "src.txt").write_text("Guten Morgen.\nDanke!\n")
    (tmp_path / "tgt.txt").write_text("Good morning.\nThanks!\n")
    table = read_parallel_text(tmp_path / "src.txt", tmp_path / "tgt.txt", "deu", "train")
    assert table.column_names == ["src_lang", "tgt_lang", "split", "src", "tgt"]
    assert table.column("tgt").to_pylist() == ["Good morning.", "Thanks!"]


def test_moses_round_trip_and_sentencepiece_decoding(pairs, pipeline):
    assert pretokenize("Don't stop, Tom!", "eng") == "Don 't stop , Tom !"
    english = pairs.filter(pa.compute.equal(pairs.column("split"), "train")).column("tgt").to_pylist()[:200]
    exact = sum(pipeline.decode(pipeline.encode(text, "eng")) == detokenize(pretokenize(text, "eng"), "eng")
                for text in english)
    assert exact == 200  # lossless: characters outside the vocabulary fall back to bytes
    ids = pipeline.encode("Ich habe Hunger.", "deu")
    assert all(i > EOS for i in ids) and pipeline.decode([BOS, *ids, EOS, PAD], "deu") == "Ich habe Hunger."


def test_the_tokeniser_refuses_held_out_text(pairs, tmp_path):
    with pytest.raises(DataError, match="training pairs only, got split\\(s\\) \\['dev', 'test'\\]"):
        TextPipeline.train(pairs.slice(0, 100_000), tmp_path / "x.model", vocab_size=500)


def test_store_is_memory_mapped(store_file, pipeline):
    before = pa.total_allocated_bytes()
    store = open_store(store_file)
    assert pa.total_allocated_bytes() - before < 10_000  # the pages are mapped, not copied
    assert store.num_rows == 2700
    first = read_pairs(TATOEBA, ["deu"], ["train"]).column("src")[0].as_py()
    assert store.column("src_ids")[0].as_py() == pipeline.encode(first, "deu")


def test_tasks_are_counter_based_budgeted_and_disjoint(tasks):
    batch = tasks.sample("train", 7, 0, 4)
    again = tasks.sample("train", 7, 2, 4)
    (src, tgt), (qsrc, qtgt) = batch
    assert src.dim() == 3 and src.shape[0] == 4 and tgt[:, :, 0].max() <= BOS
    for t in range(2):  # a slice regenerates the same tasks (padding may differ)
        for part, whole in zip((again.support[1], again.query[1]), (tgt, qtgt)):
            rows = [tuple(r[r != PAD].tolist()) for r in part[t] if (r != PAD).any()]
            assert rows == [tuple(r[r != PAD].tolist()) for r in whole[2 + t] if (r != PAD).any()]
    for t in range(4):
        support = {tuple(r[r != PAD].tolist()) for r in src[t] if (r != PAD).any()}
        query = {tuple(r[r != PAD].tolist()) for r in qsrc[t] if (r != PAD).any()}
        assert support and query and not support & query
        assert int((tgt[t] != PAD).sum()) <= 120 or len(support) == 1
    assert not torch.equal(tasks.sample("train", 8, 0, 4).support[1], tgt)  # another step, other tasks


def test_long_sources_are_counted_where_the_model_sees_them_cut(tasks, pairs, pipeline):
    rows = tasks.rows(LANGS[0], "test")
    seen = (tasks.batch(rows)[0] != PAD).sum(1).tolist()  # source pieces the model gets
    test = pairs.filter(pa.compute.and_(pa.compute.equal(pairs.column("src_lang"), LANGS[0]),
                                        pa.compute.equal(pairs.column("split"), "test")))
    whole = [len(pipeline.encode(text, LANGS[0])) for text in test.column("src").to_pylist()[:len(rows)]]
    cut = sum(s < w for s, w in zip(seen, whole))
    assert cut > 0 and tasks.sources_cut(rows) == cut


def test_validation_tasks_come_from_dev_pairs(tasks, pairs, pipeline):
    dev_sources = {tuple(pipeline.encode(s, lang)[:40]) for s, lang, split in zip(
        *(pairs.column(c).to_pylist() for c in ("src", "src_lang", "split"))) if split == "dev"}
    (src, _), _ = tasks.sample("val", 0, 0, 3)
    for sentence in src.reshape(-1, src.shape[-1]):
        if (sentence != PAD).any():
            assert tuple(sentence[sentence != PAD].tolist()) in dev_sources


def test_plain_text_files_named_in_the_job_give_the_same_pairs_and_tasks_as_the_parquet(tmp_path):
    entries = []
    for lang in ("ron", "lav"):
        for split in ("train", "dev", "test"):
            part = read_pairs(TATOEBA, [lang], [split]).slice(0, 200)
            for side in ("src", "tgt"):
                (tmp_path / f"{split}.{lang}.{side}").write_text("\n".join(part.column(side).to_pylist()) + "\n")
            entries.append({"src": str(tmp_path / f"{split}.{lang}.src"), "tgt": str(tmp_path / f"{split}.{lang}.tgt"),
                            "src_lang": lang, "split": split})
    job = load_job(JOBS / "translation_fomaml_smoke.yaml", [
        "task.languages=[ron, lav]", "task.vocab=400", f"data.parallel_text={json.dumps(entries)}",
        f"data.cache={json.dumps(str(tmp_path / 'cache'))}"])
    source = translation_source(job)
    assert read_source(source, ["lav"], ["dev"]).column("tgt").to_pylist() == \
        read_pairs(TATOEBA, ["lav"], ["dev"]).slice(0, 200).column("tgt").to_pylist()
    tasks = build_sampler(job)  # tokeniser and store from the text files
    batch = tasks.sample("train", 0, 0, 2)
    assert batch.support[0].shape[0] == 2 and (batch.query[1] == BOS).any()
    before = source_digest(source)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for entry in entries:  # the same files elsewhere: the same key, so the same cache
        for side in ("src", "tgt"):
            entry[side] = str(Path(entry[side]).rename(moved / Path(entry[side]).name))
    assert source_digest([ParallelText(**e) for e in entries]) == before
    relabelled = [ParallelText(**{**e, "src_lang": "est"}) if e["src_lang"] == "lav" else ParallelText(**e) for e in entries]
    assert source_digest(relabelled) != before  # what a file holds is part of the key


@pytest.mark.parametrize("damage", ["empty store", "garbage tokeniser"])
def test_a_damaged_translation_cache_is_rebuilt(tmp_path, caplog, damage):
    files = []
    for lang in ("ron", "lav"):
        part = read_pairs(TATOEBA, [lang], ["train"]).slice(0, 150)
        for side in ("src", "tgt"):
            (tmp_path / f"{lang}.{side}").write_text("\n".join(part.column(side).to_pylist()) + "\n")
        files.append(ParallelText(str(tmp_path / f"{lang}.src"), str(tmp_path / f"{lang}.tgt"), lang, "train"))
    _, store = prepare_translation(files, ["ron", "lav"], 500, tmp_path / "cache")
    intact = store.read_bytes()
    if damage == "empty store":
        store.write_bytes(b"")
    else:
        (store.parent / "spm.model").write_bytes(b"not a sentencepiece model")
    pipeline, again = prepare_translation(files, ["ron", "lav"], 500, tmp_path / "cache")
    assert again == store and again.read_bytes() == intact and "is unusable" in caplog.text
    assert pipeline.decode(pipeline.encode("Good day.", "eng")) == "Good day."
    assert [p.name for p in (tmp_path / "cache" / "translation").iterdir()] == [store.parent.name]

@pytest.mark.parametrize("entry, message", [
    ({"src": "a", "tgt": "b", "src_lang": "ron"}, "each entry needs src, tgt"),
    ({"src": "a", "tgt": "b", "src_lang": "ron", "split": "valid"}, "split \\(train, dev or test\\)"),
    ({"src": "a", "tgt": "b", "src_lang": "ron", "split": "dev", "lang": "x"}, "allowed keys"),
])
def test_a_malformed_parallel_text_entry_names_the_key(entry, message):
    with pytest.raises(ConfigError, match=f"data.parallel_text: .*{message}"):
        load_job(JOBS / "translation_fomaml_smoke.yaml", [f"data.parallel_text={json.dumps([entry])}"])
