"""prepare: window packing, dev split, tokenizer round-trip, manifest, idempotence, bad input via the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cachekd.tokens import PrepareConfig, TokenStore, prepare
from tests.conftest import SHARED_DATA, assert_clean_error, invoke, write_corpus


def _encode_docs(tok, docs):
    eos = tok.eos_token_id
    return [tok.backend_tokenizer.encode(d, add_special_tokens=False).ids + [eos] for d in docs]


def test_windows_and_split_exact_counts(tmp_path):
    text = tmp_path / "a.txt"
    # 10 documents separated by blank lines; dev = the last 2 (tail mode, fraction 0.2).
    docs = [f"doc {i} says hello to the number {i * 7} and then stops" for i in range(10)]
    text.write_text("\n\n".join(docs) + "\n")
    out = tmp_path / "store"
    store, built = prepare(PrepareConfig(inputs=[str(text)], output=str(out), seq_len=8, vocab_size=280,
                                         dev_fraction=0.2), progress=False)
    assert built
    tok = store.load_tokenizer()
    train_ids = np.concatenate([np.array(x) for x in _encode_docs(tok, docs[:8])])
    dev_ids = np.concatenate([np.array(x) for x in _encode_docs(tok, docs[8:])])
    m = store.manifest["splits"]
    assert m["train"]["num_tokens"] == len(train_ids)
    assert m["train"]["num_windows"] == len(train_ids) // 8
    assert m["train"]["dropped_tokens"] == len(train_ids) % 8
    assert m["dev"]["num_tokens"] == len(dev_ids)
    assert m["train"]["num_documents"] == 8 and m["dev"]["num_documents"] == 2
    got = store.read("train", 0, store.num_windows("train")).reshape(-1)
    np.testing.assert_array_equal(got, train_ids[: len(got)])
    np.testing.assert_array_equal(store.read("dev", 0, store.num_windows("dev")).reshape(-1),
                                  dev_ids[: store.num_windows("dev") * 8])
    # Documents are joined with the end-of-text token.
    assert (got == tok.eos_token_id).sum() >= 1


def test_tokenizer_round_trip_and_hf_loading(store_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(store_path) / "tokenizer"))
    text = "the big dog sat on the mat ."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<s>", "</s>"]
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.bos_token == "<s>"


def test_manifest_contents(store_path, corpus):
    m = json.loads((Path(store_path) / "manifest.json").read_text())
    assert m["format"] == "cachekd-token-store" and m["format_version"] == 1
    assert m["seq_len"] == 16 and m["vocab_size"] == len(TokenStore.open(store_path).load_tokenizer())
    assert m["dtype"] == "uint16" and m["chunk_windows"] == 4096 // 16
    assert set(m["splits"]) == {"train", "dev"}
    src = m["sources"][0]
    assert src["path"].endswith("corpus.txt") and src["size"] == corpus.stat().st_size and len(src["sha256"]) == 64
    assert m["options"]["seq_len"] == 16 and m["options"]["dev_fraction"] == 0.1
    assert len(m["tokenizer_fingerprint"]) == 64 and len(m["fingerprint"]) == 64


def test_rerun_is_noop_and_force_needed(tmp_path, corpus):
    out = tmp_path / "s"
    cfg = PrepareConfig(inputs=[str(corpus)], output=str(out), seq_len=16, vocab_size=300)
    prepare(cfg, progress=False)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    _, built = prepare(cfg, progress=False)
    assert not built and (out / "manifest.json").stat().st_mtime_ns == mtime
    other = PrepareConfig(inputs=[str(corpus)], output=str(out), seq_len=32, vocab_size=300)
    with pytest.raises(Exception, match="pass force to replace it") as info:
        prepare(other, progress=False)
    from cachekd_cli.config_options import error_message
    assert "pass --force to replace it" in error_message(info.value, "prepare")
    assert TokenStore.open(out).seq_len == 16  # untouched
    store, built = prepare(other, force=True, progress=False)
    assert built and store.seq_len == 32


def test_existing_tokenizer_and_dataset_inputs(tmp_path, store_path):
    import datasets

    rows = [{"text": f"the dog number {i} sat on the mat and the cat ran", "id": i} for i in range(60)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    tok_dir = Path(store_path) / "tokenizer"
    counts = []
    for inp in (jl, tmp_path / "d.parquet", tmp_path / "saved"):
        out = tmp_path / f"out_{inp.name}"
        st, _ = prepare(PrepareConfig(inputs=[str(inp)], output=str(out), seq_len=8, tokenizer=str(tok_dir),
                                      dev_fraction=0.1), progress=False)
        assert st.tokenizer_fingerprint == TokenStore.open(store_path).tokenizer_fingerprint
        counts.append(st.manifest["splits"]["train"]["num_tokens"])
    assert counts[0] == counts[1] == counts[2] > 0


def test_cleaning_is_opt_in(tmp_path):
    from cachekd.corpus import clean_text

    assert clean_text("  a\t\tb  \n\n   \nc   d ") == "a b\nc d"
    t = tmp_path / "x.txt"
    write_corpus(t, num_docs=40)
    a, _ = prepare(PrepareConfig(inputs=[str(t)], output=str(tmp_path / "a"), seq_len=8, vocab_size=280), progress=False)
    assert a.manifest["options"]["clean"] is False


# ------------------------------------------------------------------------------------------- bad input via CLI


def test_cli_bad_inputs(tmp_path, runner, corpus):
    out = tmp_path / "o"
    assert_clean_error(invoke(runner, ["prepare", tmp_path / "missing.txt", "-o", out]), "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert_clean_error(invoke(runner, ["prepare", empty, "-o", out, "--vocab-size", "300"]), "empty")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    assert_clean_error(invoke(runner, ["prepare", binary, "-o", out]), "not a text file")
    short = tmp_path / "short.txt"
    short.write_text("hello there\n")
    assert_clean_error(invoke(runner, ["prepare", short, "-o", out, "--vocab-size", "300", "--dev-fraction", "0"]),
                       "fewer than one window")
    assert_clean_error(invoke(runner, ["prepare", corpus, "-o", out, "--seq-len", "1"]), "--seq-len")
    assert_clean_error(invoke(runner, ["prepare", corpus, "-o", out, "--vocab-size", "100"]), "too small")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"content": "a b c"}\n')
    assert_clean_error(invoke(runner, ["prepare", jl, "-o", out, "--text-column", "text"]), "no column 'text'")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.me").write_text("precious")
    r = invoke(runner, ["prepare", corpus, "-o", other, "--vocab-size", "300"])
    assert_clean_error(r, "not empty")
    assert (other / "keep.me").read_text() == "precious"
    assert not out.exists()


def test_cli_prepare_and_info_json(tmp_path, runner, corpus):
    out = tmp_path / "s"
    r = invoke(runner, ["prepare", corpus, "-o", out, "--vocab-size", "300", "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(invoke(runner, ["info", out, "--json"]).output)
    assert info["kind"] == "token store" and info["seq_len"] == 16
    assert info["splits"]["train"]["num_windows"] > 0


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared babylm_like data not present")
def test_babylm_like_token_count(tmp_path):
    """On the real corpus, the store holds exactly what the tokenizer gives for its documents (+1 eos each)."""
    from cachekd.corpus import iter_documents, resolve_sources

    out = tmp_path / "babylm"
    store, _ = prepare(PrepareConfig(inputs=[str(SHARED_DATA)], output=str(out), seq_len=128, vocab_size=2000,
                                     dev_fraction=0.02), progress=False)
    tok = store.load_tokenizer()
    total_docs = total = 0
    records = store.manifest["source_splits"]
    for src, rec in zip(resolve_sources([str(SHARED_DATA)]), records):
        docs = list(iter_documents(src))
        tokens = sum(len(e.ids) + 1 for e in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False))
        got = rec["train"]["num_tokens"] + rec["dev"]["num_tokens"]
        if len(docs) == 1:  # one document (wikipedia_sentences.txt): cut in two, each part ending with an eos
            assert rec["held_out_by"] == "lines" and rec["dev"]["num_documents"] == 1
            assert abs(got - (tokens + 1)) <= 2  # the cut may change the BPE merge at the line break
            total_docs, total = total_docs + 2, total + got
        else:
            assert rec["held_out_by"] == "documents" and got == tokens
            total_docs, total = total_docs + len(docs), total + tokens
        assert 0.01 < rec["dev"]["num_tokens"] / got < 0.04, (src.path.name, rec)  # --dev-fraction 0.02
    s = store.manifest["splits"]
    assert s["train"]["num_documents"] + s["dev"]["num_documents"] == total_docs
    assert s["train"]["num_tokens"] + s["dev"]["num_tokens"] == total
    assert s["train"]["num_windows"] == s["train"]["num_tokens"] // 128


def test_smaller_vocabulary_than_asked_is_reported(tmp_path, runner, corpus):
    out = tmp_path / "s"
    r = invoke(runner, ["prepare", corpus, "-o", out, "--vocab-size", "60000", "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["vocab_size_requested"] == 60000 and summary["vocab_size"] < 60000
    assert "learned" in r.stderr and "not the 60000 asked for" in r.stderr
    assert TokenStore.open(out).manifest["vocab_size_requested"] == 60000
    # asked-for size reached (or a given tokenizer): nothing to report
    r = invoke(runner, ["prepare", corpus, "-o", tmp_path / "t", "--vocab-size", "300", "--seq-len", "16", "--json"])
    assert "vocab_size_requested" not in json.loads(r.stdout) and "learned" not in r.stderr


def test_uneven_documents_dev_share_is_reported(tmp_path, runner):
    """--dev-fraction holds out a share of each file's documents; when one huge last document makes the dev split
    hold far more of the tokens than asked, prepare says so (stderr) and still builds the store."""
    src = write_corpus(tmp_path / "a.txt", num_docs=40)
    with open(src, "a") as f:  # the last document (dev in --dev-mode tail) is as long as all others together
        f.write("\n".join(" ".join(["the", "cat", "sat", "."] * 8) for _ in range(120)) + "\n")
    r = invoke(runner, ["prepare", src, "-o", tmp_path / "s", "--vocab-size", "300", "--seq-len", "16",
                        "--dev-fraction", "0.02", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["splits"]
    assert s["dev"]["num_tokens"] > s["train"]["num_tokens"] * 0.1
    assert "dev split holds" in r.stderr and "--doc-sep line" in r.stderr
    # an even corpus: no note
    r = invoke(runner, ["prepare", write_corpus(tmp_path / "b.txt"), "-o", tmp_path / "t", "--vocab-size", "300",
                        "--seq-len", "16", "--dev-fraction", "0.1", "--json"])
    assert r.exit_code == 0 and "dev split holds" not in r.stderr


def test_written_files_have_the_usual_mode(tmp_path):
    """Atomically written files (manifests, configs, summaries) get the mode open() would give, not mkstemp's
    owner-only 0600."""
    import os

    from cachekd.io import atomic_write_json

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~mask


def _one_document_corpus(d: Path) -> Path:
    """Two sources: a.txt of 200 documents (blank-line blocks) and b.txt, one document of 300 lines (no blank
    line: what wikipedia_sentences.txt is)."""
    d.mkdir()
    write_corpus(d / "a.txt", num_docs=200)
    lines = [" ".join(["wiki", "says", "the", "tree", "is", "very", "big", str(i)]) + " ." for i in range(300)]
    (d / "b.txt").write_text("\n".join(lines) + "\n")
    return d


def test_every_source_gets_a_dev_share_and_the_manifest_records_its_windows(tmp_path):
    """A source of one document gets the tail of its lines as its dev share (it got none before), and the manifest
    records each source's documents, tokens and window range in each split."""
    src = _one_document_corpus(tmp_path / "corpus")
    store, _ = prepare(PrepareConfig(inputs=[str(src)], output=str(tmp_path / "s"), seq_len=16, vocab_size=300,
                                     dev_fraction=0.1), progress=False)
    rec = store.manifest["source_splits"]
    assert [r["held_out_by"] for r in rec] == ["documents", "lines"]
    assert rec[0]["dev"]["num_documents"] == 20 and rec[1]["dev"]["num_documents"] == 1
    shares = store.dev_shares()
    assert set(shares) == {"a.txt", "b.txt"}
    for name, s in shares.items():
        assert 0.05 < s["dev_share"] < 0.2, (name, s)
    # the dev text of b.txt is its last lines, the train text the rest, nothing lost
    tok = store.load_tokenizer()
    lines = (src / "b.txt").read_text().splitlines()
    n_dev = rec[1]["dev"]["num_tokens"]
    tail = next(k for k in range(1, len(lines))
                if len(_encode_docs(tok, ["\n".join(lines[-k:])])[0]) == n_dev)
    assert 0.05 * len(lines) < tail < 0.2 * len(lines)
    assert rec[1]["train"]["num_tokens"] == len(_encode_docs(tok, ["\n".join(lines[:-tail])])[0])
    # window ranges: consecutive, covering each split exactly, each source's windows starting in its tokens
    for split in ("train", "dev"):
        ranges = store.source_windows(split)
        assert ranges[0][0] == 0 and ranges[-1][1] == store.num_windows(split)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        t0 = 0
        for r, (w0, w1) in zip(rec, ranges):
            t1 = t0 + r[split]["num_tokens"]
            assert all(t0 <= w * 16 < t1 for w in range(w0, w1))
            t0 = t1
        assert sum(r[split]["num_tokens"] for r in rec) == store.manifest["splits"][split]["num_tokens"]
    assert store.summary()["dev_share_by_source"] == {k: v["dev_share"] for k, v in shares.items()}


def test_one_line_source_is_cut_at_a_space_and_one_word_is_refused(tmp_path, runner):
    d = tmp_path / "c"
    d.mkdir()
    write_corpus(d / "a.txt", num_docs=50)
    (d / "b.txt").write_text(" ".join(f"word{i % 7}" for i in range(400)) + "\n")  # one line, one document
    store, _ = prepare(PrepareConfig(inputs=[str(d)], output=str(tmp_path / "s"), seq_len=16, vocab_size=300,
                                     dev_fraction=0.1), progress=False)
    assert [r["held_out_by"] for r in store.manifest["source_splits"]] == ["documents", "words"]
    assert 0.05 < store.dev_shares()["b.txt"]["dev_share"] < 0.2
    (d / "c.txt").write_text("antidisestablishmentarianism\n")
    r = invoke(runner, ["prepare", d, "-o", tmp_path / "t", "--vocab-size", "300", "--seq-len", "16"])
    assert_clean_error(r, "c.txt", "single word", "--dev-fraction 0")
    # without a dev split nothing is held out and nothing refused
    s0, _ = prepare(PrepareConfig(inputs=[str(d)], output=str(tmp_path / "u"), seq_len=16, vocab_size=300,
                                  dev_fraction=0.0), progress=False)
    assert [r["held_out_by"] for r in s0.manifest["source_splits"]] == ["none", "none", "none"]


def test_allocate_by_size_is_proportional_with_one_each():
    from cachekd.tokens.reader import allocate_by_size

    assert allocate_by_size(10, [50, 30, 20]) == [5, 3, 2]
    assert allocate_by_size(4, [1000, 1, 1, 0]) == [2, 1, 1, 0]  # every non-empty source gets one
    assert allocate_by_size(2, [5, 5, 5]) in ([1, 1, 0], [1, 0, 1], [0, 1, 1])  # fewer draws than sources
    assert allocate_by_size(7, [3, 2, 2]) == [3, 2, 2]
    for num in range(0, 31):
        a = allocate_by_size(num, [17, 9, 4, 0])
        assert sum(a) == num and all(0 <= x <= n for x, n in zip(a, [17, 9, 4, 0]))


def test_dev_sample_draws_from_every_source_and_old_stores_fall_back(tmp_path):
    """The trainer's dev sample: seeded, the same for every call, from every source in proportion (at least one
    each); all windows when asked for as many; evenly spaced over the split, with a note, for a store whose
    manifest has no per-source records."""
    from cachekd.tokens.format import SOURCE_SPLITS
    from cachekd.tokens.reader import dev_sample

    src = _one_document_corpus(tmp_path / "corpus")
    store, _ = prepare(PrepareConfig(inputs=[str(src)], output=str(tmp_path / "s"), seq_len=16, vocab_size=300,
                                     dev_fraction=0.1), progress=False)
    n = store.num_windows("dev")
    ranges = store.source_windows("dev")
    k = n // 3
    s = dev_sample(store, k)
    assert not s.whole_split and s.num_windows == k and s.note is None
    assert np.array_equal(s.windows, dev_sample(store, k).windows)  # fixed: the same windows every time
    assert len(np.unique(s.windows)) == k and np.all(np.diff(s.windows) > 0)
    for (name, drawn), (a, b) in zip(s.per_source.items(), ranges):
        inside = ((s.windows >= a) & (s.windows < b)).sum()
        assert inside == drawn >= 1
        assert abs(drawn - k * (b - a) / n) <= 1  # proportional to the source's windows
    first = dev_sample(store, k).windows
    assert not np.all(first < ranges[0][1])  # the first k windows would all be a.txt's
    assert not np.array_equal(dev_sample(store, k, seed=1).windows, s.windows)
    whole = dev_sample(store, 0)
    assert whole.whole_split and np.array_equal(whole.windows, np.arange(n))
    assert dev_sample(store, n + 5).whole_split
    # a store from before the per-source records
    manifest = dict(store.manifest)
    del manifest[SOURCE_SPLITS]
    old = TokenStore(store.path, manifest)
    o = dev_sample(old, k)
    assert o.per_source is None and "evenly spaced" in o.note and "--force" in o.note
    assert o.num_windows == k and o.windows[0] == 0 and o.windows[-1] == n - 1
    assert old.dev_shares() is None and "dev_share_by_source" not in old.summary()


def test_prepare_says_when_an_up_to_date_store_lacks_the_per_source_records(tmp_path, runner):
    src = _one_document_corpus(tmp_path / "corpus")
    args = ["prepare", src, "-o", tmp_path / "s", "--vocab-size", "300", "--seq-len", "16", "--dev-fraction", "0.1"]
    r = invoke(runner, args)
    assert r.exit_code == 0 and "dev_share_by_source" in r.stdout and "b.txt" in r.stdout, r.output
    mf = tmp_path / "s" / "manifest.json"
    m = json.loads(mf.read_text())
    del m["source_splits"]  # what an older cachekd wrote
    mf.write_text(json.dumps(m))
    r = invoke(runner, args)
    assert r.exit_code == 0 and "nothing to do" in r.stdout
    assert "before cachekd recorded each source's dev share" in r.stderr and "--force" in r.stderr
    r = invoke(runner, args + ["--force"])
    assert r.exit_code == 0 and "source_splits" in json.loads(mf.read_text())
