import json

import pytest

from gqa import GQAError
from gqa.data import prepare, read_documents

DOCS = [f"document number {i} says that heads share keys and values in group {i % 7}." for i in range(300)]


def test_sources_give_the_same_documents(tmp_path):
    (tmp_path / "one.txt").write_text("\n\n".join(DOCS))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(0, 300, 100):
        (folder / f"part{i:03d}.txt").write_text("\n\n".join(DOCS[i : i + 100]))
    (folder / ".hidden.txt").write_text("not a document")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(tmp_path / "dict"))
    for source in ("one.txt", "folder", "rows.jsonl", "saved", "dict"):
        assert read_documents(tmp_path / source) == DOCS, source


def test_bundled_corpus_by_name():
    wiki, shakespeare = read_documents("wiki"), read_documents("shakespeare")
    assert len(wiki) == 10_033 and len(shakespeare) == 2_948
    assert read_documents("bundled") == wiki + shakespeare
    assert any("Hamlet" in d for d in shakespeare)


def test_general_mix_holds_every_kind_of_text():
    """`general` (the default calibration text) is the five sources, each read from the installed package."""
    parts = {name: read_documents(name) for name in ("wiki", "shakespeare", "code", "docs", "dialogue")}
    assert {name: len(docs) for name, docs in parts.items()} == {
        "wiki": 10_033, "shakespeare": 2_948, "code": 2_472, "docs": 2_199, "dialogue": 146}
    assert read_documents("general") == [d for docs in parts.values() for d in docs]
    assert any("struct llama_context" in d for d in parts["code"])  # llama.cpp's C++
    assert any("def " in d and "    return" in d for d in parts["code"])  # Python, indentation kept
    assert any(".. code-block::" in d or "```" in d for d in parts["docs"])
    assert any(d.startswith("A: ") and "\nB: " in d for d in parts["dialogue"])


def test_no_calibration_text_holds_a_held_out_passage():
    """python-reference (CPython's language reference, a held-out set) shares no line of prose with any
    bundled corpus: lines of 40+ characters with 20+ letters (rules such as '=====' are left aside)."""
    import pydoc_data.topics

    def prose_lines(texts):
        return {line.strip() for text in texts for line in text.splitlines()
                if len(line.strip()) >= 40 and sum(c.isalpha() for c in line) >= 20}

    held_out = prose_lines(pydoc_data.topics.topics.values())
    assert len(held_out) > 3000
    assert prose_lines(read_documents("general")) & held_out == set()


def test_bad_sources(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(GQAError, match="bad.jsonl:2 has no string field 'text'"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(GQAError, match="is not UTF-8 text"):
        read_documents(tmp_path / "latin1.txt")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": DOCS}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(GQAError, match="has no 'text' column"):
        read_documents(tmp_path / "nocol")


def test_blocks_are_packed_with_end_of_text(tmp_path, tokenizer):
    (tmp_path / "t.txt").write_text("\n\n".join(DOCS))
    data = prepare(tmp_path / "t.txt", tokenizer, seq_len=16, val_fraction=0.1)
    assert data.train.shape[1] == data.val.shape[1] == 17
    eos = tokenizer.eos_token_id
    assert (data.train == eos).sum() > 0  # documents are separated by the end-of-text token
    assert data.train_tokens + data.val_tokens == sum(len(tokenizer(d)["input_ids"]) + 1 for d in DOCS)
