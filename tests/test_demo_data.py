"""The generated demo corpus and minimal pairs: deterministic, grammatical by the grammar's own recogniser."""

from __future__ import annotations

import json
import re

import pytest

from cachekd.demo import data as dd


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return dd.generate_corpus(120, seed=0)


@pytest.fixture(scope="module")
def pairs() -> dict[str, list[dict]]:
    return dd.generate_minimal_pairs(25, seed=1)


def test_corpus_is_deterministic_and_seeded(corpus):
    assert dd.generate_corpus(120, seed=0) == corpus
    other = dd.generate_corpus(120, seed=3)
    assert other != corpus
    assert len(set(corpus)) > 110  # documents are not repeated


def test_documents_have_3_to_8_sentences_and_parse(corpus):
    kinds = {"dialogue": 0, "other": 0}
    for doc in corpus:
        assert "\n\n" not in doc and doc.strip() == doc
        lines = doc.splitlines()
        assert 3 <= len(lines) <= 8
        kinds["dialogue" if re.match(r"^[A-Z][a-z]+: ", lines[0]) else "other"] += 1
        for sentence in dd.iter_sentences(doc):
            assert sentence[0].isupper() and sentence[-1] in ".?!"
            assert dd.is_grammatical(sentence), sentence
    assert kinds["dialogue"] > 10 and kinds["other"] > 10


def test_vocabulary_is_varied(corpus):
    assert len(dd.vocabulary()) >= 300
    words = {w for doc in dd.generate_corpus(1500, seed=0) for w in re.findall(r"[a-z']+", doc.lower())}
    assert len(words) >= 600  # a few hundred lemmas, with their inflected forms


def test_recogniser_accepts_the_grammar_and_rejects_violations():
    good = ["The dog sleeps.", "The dogs near the cat are happy.", "Mia hugged herself.", "Did the boy eat an apple?",
            "These cats chased the mouse.", "Look, the children have eaten the cookies."]
    bad = ["The dog sleep.", "The dogs near the cat is happy.", "Mia hugged himself.", "Did the boy ate an apple?",
           "These cat chased the mouse.", "The dog slept the ball.", "The dog needed.", "Did the boy eat a apple?",
           "The boy eaten the cake.", "Sleeps dog the."]
    for s in good:
        assert dd.is_grammatical(s), s
    for s in bad:
        assert not dd.is_grammatical(s), s


def test_pairs_are_deterministic(pairs):
    assert dd.generate_minimal_pairs(25, seed=1) == pairs
    assert dd.generate_minimal_pairs(25, seed=2) != pairs


def test_every_phenomenon_present_in_blimp_format(pairs):
    assert set(pairs) == set(dd.PHENOMENA)
    assert len(pairs) >= 5
    assert len({term for _, term in dd.PHENOMENA.values()}) >= 5  # at least 5 distinct linguistic phenomena
    for uid, records in pairs.items():
        assert len(records) == 25
        assert len({r["sentence_good"] for r in records}) == 25
        for r in records:
            assert r["UID"] == uid
            assert (r["field"], r["linguistics_term"]) == dd.PHENOMENA[uid]
            assert {"sentence_good", "sentence_bad", "UID", "field", "linguistics_term"} <= set(r)


def test_pairs_differ_in_one_word_good_is_generated_bad_is_not(pairs):
    for uid, records in pairs.items():
        for r in records:
            g, b = r["sentence_good"].split(), r["sentence_bad"].split()
            assert len(g) == len(b)
            assert sum(x != y for x, y in zip(g, b)) == 1, r
            assert dd.is_grammatical(r["sentence_good"]), r
            assert not dd.is_grammatical(r["sentence_bad"]), r


def test_pair_contrasts_are_the_named_ones(pairs):
    def changed(r):
        return next((x, y) for x, y in zip(r["sentence_good"].split(), r["sentence_bad"].split()) if x != y)

    reflexives = {"himself", "herself", "itself", "themselves"}
    for r in pairs["anaphor_gender_agreement"]:
        assert {w.strip(".") for w in changed(r)} == {"himself", "herself"}
    for r in pairs["anaphor_number_agreement"]:
        assert {w.strip(".") for w in changed(r)} <= reflexives
    strict_intr = {f for lemma in dd.STRICT_INTRANSITIVE for f in dd.verb_forms(lemma).values()}
    strict_tr = {f for lemma in dd.STRICT_TRANSITIVE for f in dd.verb_forms(lemma).values()}
    for r in pairs["transitive"]:
        assert changed(r)[1].strip(".") in strict_intr
    for r in pairs["intransitive"]:
        assert changed(r)[1].strip(".!?") in strict_tr
    for r in pairs["question_auxiliary_agreement"]:
        assert r["sentence_good"].endswith("?")
        assert changed(r)[0] in {"Is", "Are", "Was", "Were", "Does", "Do", "Has", "Have"}


def test_write_demo_data(tmp_path):
    info = dd.write_demo_data(tmp_path, num_documents=60, num_pairs=8, seed=0)
    text = (tmp_path / "corpus" / "demo.txt").read_text()
    docs = text.strip("\n").split("\n\n")
    assert docs == dd.generate_corpus(60, seed=0)
    assert info["num_documents"] == 60 and info["num_pairs"] == 8 * len(dd.PHENOMENA)
    corpus_sentences = {s for d in docs for s in dd.iter_sentences(d)}
    for uid in dd.PHENOMENA:
        lines = (tmp_path / "minimal_pairs" / f"{uid}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 8
        assert not any(r["sentence_good"] in corpus_sentences for r in records)
    again = tmp_path / "again"
    dd.write_demo_data(again, num_documents=60, num_pairs=8, seed=0)
    assert (again / "corpus" / "demo.txt").read_bytes() == text.encode()
