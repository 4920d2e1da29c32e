"""Evaluation: scores against independent float64 loops, perplexity of a uniform model, minimal-pair accuracy,
and the `cachekd eval` command's handling of bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cachekd.demo import data as demo_data
from cachekd.errors import CachekdError
from cachekd.evaluate import check_tokenizer_matches, dev_loss, evaluate
from cachekd.minimal_pairs import minimal_pair_accuracy, prefix_ids, sentence_logprobs
from cachekd.models import ModelConfig, build_model
from cachekd.rundir import save_eval
from cachekd.tokens import PrepareConfig, TokenStore, prepare
from cachekd_cli.main import cli

SEQ_LEN = 16


# ------------------------------------------------------------------------------------------------ fixtures


def _make_store(root: Path, name: str, vocab_size: int) -> TokenStore:
    corpus = root / f"{name}-corpus" / "demo.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("\n\n".join(demo_data.generate_corpus(150, seed=0)) + "\n")
    cfg = PrepareConfig(inputs=[str(corpus)], output=str(root / name), seq_len=SEQ_LEN, vocab_size=vocab_size,
                        dev_fraction=0.1)
    store, _ = prepare(cfg, progress=False)
    return store


@pytest.fixture(scope="session")
def stores(tmp_path_factory) -> tuple[TokenStore, TokenStore]:
    """A demo token store and one of the same text with another tokenizer (a different vocabulary size)."""
    root = tmp_path_factory.mktemp("stores")
    return _make_store(root, "tokens", 320), _make_store(root, "other", 300)


@pytest.fixture(scope="session")
def store(stores) -> TokenStore:
    return stores[0]


def tiny_model(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="llama", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = build_model(cfg, vocab_size=vocab_size, max_positions=64, special={"pad": 0, "bos": 1, "eos": 2})
    return model.eval()


def uniform(model):
    """Zero the LM head: every logit is 0, so q(v) = 1/V at every position."""
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    return model


def make_run(root: Path, name: str, model, tokenizer, *, mode: str = "train", objective: str = "ce",
             steps: int = 20, final: bool = True, loss0: float = 5.0) -> Path:
    """A run directory as the trainer writes it: model/ (weights + tokenizer), metrics.jsonl, summary.json."""
    run = root / name
    (run / "model").mkdir(parents=True)
    model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "config.yaml").write_text(f"name: {name}\n")
    lines = []
    for step in range(1, steps + 1):
        loss = loss0 * 0.97 ** step
        lines.append({"kind": "train", "step": step, "epoch": 0, "tokens": step * 512, "wall_s": 0.1 * step,
                      "loss": loss, "ce": loss, "kd": None if mode == "train" else loss / 2,
                      "alpha": None if mode == "train" else 0.5, "lr": 1e-3, "tokens_per_s": 5120.0})
        if step % 5 == 0:
            lines.append({"kind": "dev", "step": step, "tokens": step * 512, "wall_s": 0.1 * step + 0.01,
                          "dev_loss": loss + 0.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if final:
        (run / "summary.json").write_text(json.dumps({
            "name": name, "mode": mode, "objective": objective, "steps": steps, "tokens": steps * 512,
            "wall_s": 0.1 * steps, "num_params": sum(p.numel() for p in model.parameters()),
            "final_dev_loss": lines[-1]["dev_loss"] if lines[-1]["kind"] == "dev" else None, "extra_key": 1,
        }))
    return run


def invoke(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    return result


def assert_one_clean_error(result, *fragments: str) -> None:
    out = result.output
    assert result.exit_code != 0, out
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, out
    for frag in fragments:
        assert frag.lower() in error_lines[0].lower(), out


# ------------------------------------------------------------------------------------------------ references


def reference_score(model64, ids: list[int], first_scored: int) -> float:
    """sum_{t >= first_scored} log q(ids[t] | ids[:t]), one unpadded sequence, float64."""
    if len(ids) <= first_scored:
        return 0.0
    with torch.no_grad():
        logits = model64(input_ids=torch.tensor([ids])).logits[0]  # (T, V) float64
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(first_scored, len(ids))))


# ------------------------------------------------------------------------------------------------ scoring


SENTENCES = ["The dog sleeps.", "Mia and Max were hungry.", "Did the little bunny hide itself under the table?", "",
             "Oh", "Look, the children have eaten the cookies in the kitchen again!"]


@pytest.mark.parametrize("prefix", ["bos", None, "Once upon a time,"])
def test_sentence_logprobs_match_float64_loop(store, prefix):
    tok = store.load_tokenizer()
    model = tiny_model(store.vocab_size)
    model64 = copy.deepcopy(model).double()
    got = sentence_logprobs(model, tok, SENTENCES, prefix=prefix, batch_size=4)
    ctx = prefix_ids(tok, prefix)
    if prefix == "bos":
        assert ctx == [tok.bos_token_id] == [1]
    want = [reference_score(model64, ctx + tok(s, add_special_tokens=False)["input_ids"], max(len(ctx), 1))
            for s in SENTENCES]
    assert got == pytest.approx(want, abs=1e-4, rel=1e-5)
    assert got[3] == 0.0  # the empty sentence has nothing to score
    assert all(g < 0 for g, s in zip(got, SENTENCES) if s and (prefix is not None or len(tok(s)["input_ids"]) > 1))
    # batching and padding do not change scores
    one_by_one = sentence_logprobs(model, tok, SENTENCES, prefix=prefix, batch_size=1)
    assert got == pytest.approx(one_by_one, abs=1e-5)


def test_uniform_model_perplexity_is_vocab_size(store):
    model = uniform(tiny_model(store.vocab_size))
    r = dev_loss(model, store, batch_size=3, progress=False)
    assert r["ppl"] == pytest.approx(store.vocab_size, rel=1e-4)
    assert r["loss"] == pytest.approx(math.log(store.vocab_size), rel=1e-6)
    assert r["num_windows"] == store.num_windows("dev")
    assert r["num_tokens"] == store.num_windows("dev") * (SEQ_LEN - 1)
    capped = dev_loss(model, store, max_windows=2, progress=False)
    assert (capped["num_windows"], capped["num_tokens"]) == (2, 2 * (SEQ_LEN - 1))


def test_dev_loss_matches_float64_loop(store):
    model = tiny_model(store.vocab_size, seed=3)
    model64 = copy.deepcopy(model).double()
    n = 5
    windows = store.read("dev", 0, n)
    total = sum(-reference_score(model64, [int(t) for t in w], 1) for w in windows)
    r = dev_loss(model, store, split="dev", batch_size=2, max_windows=n, progress=False)
    assert r["loss"] == pytest.approx(total / (n * (SEQ_LEN - 1)), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    train = dev_loss(model, store, split="train", max_windows=n, progress=False)
    assert train["loss"] != r["loss"]
    with pytest.raises(CachekdError, match="no 'test' split"):
        dev_loss(model, store, split="test", progress=False)


# ------------------------------------------------------------------------------------------------ minimal pairs


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_minimal_pair_accuracy_all_right_then_all_wrong(store, tmp_path):
    """A uniform model gives log P = -n·log V, so it prefers the sentence with fewer tokens: make the good one
    shorter in every pair (100%), then mirror the fixture (0%)."""
    tok = store.load_tokenizer()
    model = uniform(tiny_model(store.vocab_size))
    pairs = [("The dog sleeps.", "The big dog sleeps."), ("Mia ran.", "Mia ran to the park."),
             ("Is he happy?", "Is he very happy?"), ("We ate.", "We ate the cake today.")]
    for good, bad in pairs:
        assert len(tok(good)["input_ids"]) < len(tok(bad)["input_ids"])
    agreement = [{"sentence_good": g, "sentence_bad": b, "field": "morphology", "UID": "a"} for g, b in pairs[:2]]
    structure = [{"sentence_good": g, "sentence_bad": b, "field": "syntax", "UID": "b"} for g, b in pairs[2:]]
    d = tmp_path / "pairs"
    _write_jsonl(d / "agreement.jsonl", agreement)
    _write_jsonl(d / "structure.jsonl", structure + structure[:1])
    r = minimal_pair_accuracy(model, tok, d, progress=False)
    assert r["macro_accuracy"] == 1.0 and r["micro_accuracy"] == 1.0
    assert r["num_pairs"] == 5 and r["num_files"] == 2
    assert set(r["by_group"]) == {"morphology", "syntax"}
    assert r["by_file"]["structure"]["num_pairs"] == 3 and r["by_file"]["structure"]["group"] == "syntax"

    mirrored = tmp_path / "mirrored"
    for name, recs in (("agreement", agreement), ("structure", structure)):
        _write_jsonl(mirrored / f"{name}.jsonl",
                     [dict(x, sentence_good=x["sentence_bad"], sentence_bad=x["sentence_good"]) for x in recs])
    r = minimal_pair_accuracy(model, tok, mirrored, progress=False)
    assert r["macro_accuracy"] == 0.0 and r["num_correct"] == 0

    # ties count as wrong; a file without `field` is its own group; one file alone works
    tie = _write_jsonl(tmp_path / "tie.jsonl", [{"sentence_good": "The dog sleeps.", "sentence_bad": "The dog sleeps."},
                                                {"sentence_good": pairs[0][0], "sentence_bad": pairs[0][1]}])
    r = minimal_pair_accuracy(model, tok, tie, progress=False)
    assert r["by_file"]["tie"]["accuracy"] == 0.5 and list(r["by_group"]) == ["tie"]


def test_macro_average_on_demo_pairs_matches_token_counts(store, tmp_path):
    """On the demo pairs the uniform model is right exactly where the good sentence has fewer tokens: the real
    scoring and aggregation must reproduce that count per file, and the macro average over files."""
    tok = store.load_tokenizer()
    model = uniform(tiny_model(store.vocab_size))
    pairs = demo_data.generate_minimal_pairs(6, seed=5)
    for uid, recs in pairs.items():
        _write_jsonl(tmp_path / f"{uid}.jsonl", recs)
    r = minimal_pair_accuracy(model, tok, tmp_path, prefix=None, progress=False)
    expected = {}
    for uid, recs in pairs.items():
        n = [(len(tok(x["sentence_good"])["input_ids"]), len(tok(x["sentence_bad"])["input_ids"])) for x in recs]
        expected[uid] = sum(g < b for g, b in n) / len(recs)
        assert r["by_file"][uid]["accuracy"] == pytest.approx(expected[uid]), uid
    assert r["macro_accuracy"] == pytest.approx(sum(expected.values()) / len(expected))
    assert set(r["by_group"]) == {"morphology", "syntax"}


def test_bad_pair_files(store, tmp_path):
    tok = store.load_tokenizer()
    model = tiny_model(store.vocab_size)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"sentence_good": "A.", "sentence_bad": "B."}\n\n{"sentence_good": "A.", \n')
    with pytest.raises(CachekdError, match="line 3 is not valid JSON"):
        minimal_pair_accuracy(model, tok, broken, progress=False)
    missing = _write_jsonl(tmp_path / "missing.jsonl", [{"sentence_good": "A.", "sentence_bad": "B."},
                                                        {"sentence_good": "A."}])
    with pytest.raises(CachekdError, match="line 2 has no 'sentence_bad'"):
        minimal_pair_accuracy(model, tok, missing, progress=False)
    empty = _write_jsonl(tmp_path / "empty_sentence.jsonl", [{"sentence_good": " ", "sentence_bad": "B."}])
    with pytest.raises(CachekdError, match="line 1 has an empty 'sentence_good'"):
        minimal_pair_accuracy(model, tok, empty, progress=False)
    with pytest.raises(CachekdError, match="holds no .jsonl"):
        minimal_pair_accuracy(model, tok, _empty_dir(tmp_path), progress=False)
    # files in subdirectories count (BabyLM ships blimp_filtered/ and supplement_filtered/ side by side)
    nested = tmp_path / "nested"
    _write_jsonl(nested / "a.jsonl", [{"sentence_good": "A.", "sentence_bad": "B."}])
    _write_jsonl(nested / "sub" / "b.jsonl", [{"sentence_good": "A.", "sentence_bad": "B."}])
    assert minimal_pair_accuracy(model, tok, nested, progress=False)["num_files"] == 2


def _empty_dir(root: Path) -> Path:
    d = root / "empty"
    d.mkdir(exist_ok=True)
    return d


# ------------------------------------------------------------------------------------------------ checks, evaluate


def test_check_tokenizer_matches(stores, tmp_path):
    store, other = stores
    run = make_run(tmp_path, "run", tiny_model(store.vocab_size), store.load_tokenizer())
    check_tokenizer_matches(run, store)  # same tokenizer: no error
    check_tokenizer_matches(store.load_tokenizer(), store, model_vocab_size=store.vocab_size)
    with pytest.raises(CachekdError, match="different tokenizer"):
        check_tokenizer_matches(run, other)
    with pytest.raises(CachekdError, match="different tokenizer"):
        check_tokenizer_matches(other.load_tokenizer(), store)
    with pytest.raises(CachekdError, match="vocabulary of 320"):
        check_tokenizer_matches(store.load_tokenizer(), store, model_vocab_size=100)


def test_evaluate_bundle_and_save(store, tmp_path):
    model = tiny_model(store.vocab_size)
    run = make_run(tmp_path, "run", model, store.load_tokenizer())
    pairs = _write_jsonl(tmp_path / "p" / "x.jsonl", demo_data.generate_minimal_pairs(3)["transitive"])
    r = evaluate(run, dev_store=store.path, minimal_pairs=pairs.parent, max_windows=4, progress=False)
    assert "dev" not in r  # four windows are not the whole dev split
    (part,) = r["losses"].values()
    assert part["num_windows"] == 4 and r["minimal_pairs"]["num_pairs"] == 3
    assert r["run_dir"] == str(run) and r["model"] == str(run / "model")
    assert r["num_params"] == sum(p.numel() for p in model.parameters())
    assert part["loss"] == pytest.approx(dev_loss(model, store, max_windows=4, progress=False)["loss"], rel=1e-6)
    assert part["key"] == "dev:first4" and not part["complete"] and list(r["losses"]) == ["dev:first4"]
    path = save_eval(r, run)
    only_dev = evaluate(run, dev_store=store.path, max_windows=2, progress=False)
    save_eval(only_dev, run)
    saved = json.loads(path.read_text())
    assert saved["minimal_pairs"]["num_pairs"] == 3  # kept: same checkpoint
    assert {k: v["num_windows"] for k, v in saved["losses"].items()} == {"dev:first2": 2, "dev:first4": 4}
    assert "dev" not in saved  # the top-level "dev" is only ever the whole dev split
    with pytest.raises(CachekdError, match="not a logit cache"):
        evaluate(run, dev_store=store.path, against_cache=tmp_path)
    with pytest.raises(CachekdError, match="nothing to evaluate"):
        evaluate(run)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_eval_run_dir_saves_and_prints(store, tmp_path):
    run = make_run(tmp_path, "run", tiny_model(store.vocab_size), store.load_tokenizer())
    pairs = tmp_path / "pairs"
    for uid, recs in demo_data.generate_minimal_pairs(4).items():
        _write_jsonl(pairs / f"{uid}.jsonl", recs)
    res = invoke("eval", run, "--dev", store.path, "--minimal-pairs", pairs, "--quiet", "--max-windows", 3)
    assert res.exit_code == 0, res.output
    assert "dev:first3" in res.output and "subject_verb_agreement" in res.output and "morphology" in res.output
    saved = json.loads((run / "eval.json").read_text())
    assert saved["minimal_pairs"]["num_pairs"] == 4 * len(demo_data.PHENOMENA)
    res = invoke("eval", run / "model", "--minimal-pairs", pairs / "transitive.jsonl", "--json", "--no-save",
                 "--no-prefix")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["minimal_pairs"]["prefix"] is None and "saved" not in out
    res = invoke("eval", run, "--minimal-pairs", pairs / "transitive.jsonl", "--markdown", "--no-save")
    assert res.exit_code == 0 and "| phenomenon |" in res.output


def test_cli_eval_model_without_weights(store, tmp_path):
    d = tmp_path / "ckpt"
    tiny_model(store.vocab_size).config.save_pretrained(d)
    res = invoke("eval", d, "--dev", store.path, "--quiet")
    assert_one_clean_error(res, "no weights")
    res = invoke("eval", tmp_path / "nowhere", "--dev", store.path, "--quiet")
    assert_one_clean_error(res, "does not exist")


def test_cli_eval_malformed_json_line(store, tmp_path):
    run = make_run(tmp_path, "run", tiny_model(store.vocab_size), store.load_tokenizer())
    bad = tmp_path / "pairs" / "bad.jsonl"
    bad.parent.mkdir()
    good_line = json.dumps({"sentence_good": "The dog sleeps.", "sentence_bad": "The dog sleep."})
    bad.write_text(f"{good_line}\n{good_line}\n{{not json\n{good_line}\n")
    res = invoke("eval", run, "--minimal-pairs", bad.parent, "--quiet")
    assert_one_clean_error(res, "line 3", "bad.jsonl")
    missing = tmp_path / "pairs2" / "m.jsonl"
    _write_jsonl(missing, [{"sentence_good": "The dog sleeps."}])
    res = invoke("eval", run, "--minimal-pairs", missing, "--quiet")
    assert_one_clean_error(res, "line 1", "sentence_bad")
    assert not (run / "eval.json").exists()


def test_cli_eval_store_from_another_tokenizer(stores, tmp_path):
    store, other = stores
    run = make_run(tmp_path, "run", tiny_model(store.vocab_size), store.load_tokenizer())
    res = invoke("eval", run, "--dev", other.path, "--quiet")
    assert_one_clean_error(res, "different tokenizer")


def test_cli_eval_usage_errors(store, tmp_path):
    run = make_run(tmp_path, "run", tiny_model(store.vocab_size), store.load_tokenizer())
    res = invoke("eval", run, "--minimal-pairs", tmp_path, "--prefix", "x", "--no-prefix")
    assert res.exit_code == 2 and "exclude each other" in res.output
    res = invoke("eval", run)
    assert_one_clean_error(res, "nothing to evaluate")


def test_against_cache_teacher_agrees_with_itself(tmp_path, store_path, teacher_path, teacher_b_path):
    """A teacher scored against its own cache: KL ≈ 0 (fixed-point rounding only), top-1 agreement ~1; another model
    has a clearly positive KL. Full and top-k caches both."""
    from click.testing import CliRunner

    from cachekd.evaluate import evaluate
    from tests.conftest import invoke

    for mode in (["--top-k", "8"], ["--full"]):
        c = tmp_path / f"cache{len(mode)}"
        r = invoke(CliRunner(), ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", c, "--quiet", *mode])
        assert r.exit_code == 0, r.output
        same = evaluate(teacher_path, dev_store=store_path, against_cache=c, progress=False)["against_cache"]
        (res,) = same["teachers"].values()
        # near-flat random teachers have near-ties, which storage rounding may flip
        assert res["kl"] < 2e-3 and res["top1_agreement"] > 0.95 and res["positions"] > 0
        other = evaluate(teacher_b_path, dev_store=store_path, against_cache=c, progress=False)["against_cache"]
        (res_b,) = other["teachers"].values()
        assert res_b["kl"] > 10 * max(res["kl"], 1e-4)


def test_against_cache_with_a_moved_store_says_pass_dev(tmp_path, store_path, teacher_path):
    import shutil

    from click.testing import CliRunner

    from cachekd.errors import CachekdError
    from cachekd.evaluate import evaluate
    from tests.conftest import invoke

    st = tmp_path / "st"
    shutil.copytree(store_path, st)
    r = invoke(CliRunner(), ["precompute", "--store", st, "--teacher", teacher_path, "-o", tmp_path / "c", "--quiet",
                             "--top-k", "4"])
    assert r.exit_code == 0, r.output
    st.rename(tmp_path / "moved")
    with pytest.raises(CachekdError, match="is not there any more; pass its new location with dev_store") as info:
        evaluate(teacher_path, against_cache=tmp_path / "c", progress=False)
    from cachekd_cli.config_options import error_message
    assert "pass its new location with --dev STORE" in error_message(info.value, "eval")
    res = evaluate(teacher_path, dev_store=tmp_path / "moved", against_cache=tmp_path / "c", progress=False)
    assert res["against_cache"]["teachers"]


def test_eval_results_are_kept_by_what_was_measured(store, tmp_path):
    """A quick train-split check never replaces the run's dev loss; compare reports only the whole dev split."""
    from cachekd.compare import compare_runs

    run = make_run(tmp_path, "run", tiny_model(store.vocab_size), store.load_tokenizer())
    pairs = _write_jsonl(tmp_path / "p" / "x.jsonl", demo_data.generate_minimal_pairs(3)["transitive"])
    res = invoke("eval", run, "--dev", store.path, "--minimal-pairs", pairs, "--quiet")
    assert res.exit_code == 0, res.output
    assert f"Saved to {run / 'eval.json'}" in res.output and "losses['dev']" in res.output
    full = json.loads((run / "eval.json").read_text())["dev"]
    assert full["complete"] and full["split"] == "dev" and full["num_windows"] == store.num_windows("dev")

    res = invoke("eval", run / "model", "--dev", store.path, "--split", "train", "--max-windows", 5, "--quiet")
    assert res.exit_code == 0, res.output
    assert "losses['train:first5']" in res.output and "does not report it" in res.output
    saved = json.loads((run / "eval.json").read_text())
    assert saved["dev"] == full and saved["minimal_pairs"]["num_pairs"] == 3
    assert saved["losses"]["train:first5"]["split"] == "train" and saved["losses"]["dev"] == full
    row = compare_runs([run], tmp_path / "cmp")["rows"][0]
    assert row["dev_loss"] == pytest.approx(full["loss"]) and row["dev_from"] == "eval"

    # an eval.json from before the keyed losses: a train-split "dev" entry is never taken for the dev loss
    legacy = {"model": str(run / "model"), "checkpoint_fingerprint": saved["checkpoint_fingerprint"],
              "dev": {**saved["losses"]["train:first5"], "max_windows": 5}}
    for k in ("complete", "key", "split_windows"):
        legacy["dev"].pop(k)
    (run / "eval.json").write_text(json.dumps(legacy))
    row = compare_runs([run], tmp_path / "cmp")["rows"][0]
    assert row["dev_from"] == "trainer"  # the trainer's own dev loss instead
    save_eval(evaluate(run, dev_store=store.path, max_windows=3, progress=False), run)
    saved = json.loads((run / "eval.json").read_text())
    assert set(saved["losses"]) == {"train:first5", "dev:first3"} and "dev" not in saved


def test_eval_of_an_unfinished_run_says_so(store, tmp_path):
    run = tmp_path / "unfinished"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: u\ndistill:\n  cache: c\n")
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / "step_00000100.pt").write_bytes(b"")
    for target in (run, run / "model"):
        res = invoke("eval", target, "--dev", store.path, "--quiet")
        assert_one_clean_error(res, "has not finished", "step 100", f"cachekd distill -c {run / 'config.yaml'} --resume")


# ------------------------------------------------------------------------------------------------ conventions, limits


def _demo_pair_dir(root: Path, num: int, seed: int = 0) -> Path:
    for uid, recs in demo_data.generate_minimal_pairs(num, seed=seed).items():
        _write_jsonl(root / f"{uid}.jsonl", recs)
    return root


def test_minimal_pair_results_are_kept_per_file_set_and_prefix(store, tmp_path):
    """A later eval on other files, or with another prefix, adds a result; the same measurement again replaces it.
    Each result records its prefix, and compare gives each convention its own column."""
    from cachekd.compare import compare_runs

    run = make_run(tmp_path, "run", tiny_model(store.vocab_size), store.load_tokenizer())
    first = _write_jsonl(tmp_path / "a" / "transitive.jsonl", demo_data.generate_minimal_pairs(3)["transitive"])
    other = _demo_pair_dir(tmp_path / "b", 2)
    assert invoke("eval", run, "--minimal-pairs", first.parent, "--quiet").exit_code == 0
    res = invoke("eval", run, "--minimal-pairs", other, "--quiet")
    assert res.exit_code == 0 and "prefix" in res.output and "eos" in res.output
    res = invoke("eval", run, "--minimal-pairs", other, "--prefix", "bos", "--quiet")
    assert res.exit_code == 0, res.output
    saved = json.loads((run / "eval.json").read_text())
    results = saved["minimal_pairs_results"]
    assert sorted((r["pair_set"], r["prefix"], r["num_pairs"]) for r in results.values()) == [
        ("a", "eos", 3), ("b", "bos", 2 * len(demo_data.PHENOMENA)), ("b", "eos", 2 * len(demo_data.PHENOMENA))]
    assert all(k == r["key"] and f"prefix={r['prefix']}" in k for k, r in results.items())
    assert saved["minimal_pairs"]["prefix"] == "bos"  # the latest
    # the same measurement again replaces its result only
    assert invoke("eval", run, "--minimal-pairs", other, "--prefix", "bos", "--quiet").exit_code == 0
    assert json.loads((run / "eval.json").read_text())["minimal_pairs_results"].keys() == results.keys()
    # same directory name, other pairs: another result
    changed = _demo_pair_dir(tmp_path / "c" / "b", 3, seed=1)
    assert invoke("eval", run, "--minimal-pairs", changed, "--quiet").exit_code == 0
    assert len(json.loads((run / "eval.json").read_text())["minimal_pairs_results"]) == 4

    r = compare_runs([run], tmp_path / "cmp")
    mp_columns = [c for c in r["columns"] if c.startswith("mp[")]
    assert len(mp_columns) == 4 and "mp[a prefix=eos]" in mp_columns and "mp[b prefix=bos]" in mp_columns
    assert sum(c.startswith("mp[b#") and c.endswith(" prefix=eos]") for c in mp_columns) == 2  # told apart
    row = r["rows"][0]
    for key, mp in json.loads((run / "eval.json").read_text())["minimal_pairs_results"].items():
        assert sum(row[c] == pytest.approx(mp["macro_accuracy"]) for c in mp_columns) >= 1


def test_eval_json_never_puts_a_train_split_loss_under_dev(store, tmp_path):
    run = make_run(tmp_path, "run", tiny_model(store.vocab_size), store.load_tokenizer())
    res = invoke("eval", run, "--dev", store.path, "--split", "train", "--max-windows", 3, "--json", "--no-save")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert "dev" not in out and list(out["losses"]) == ["train:first3"]
    assert out["losses"]["train:first3"]["split"] == "train"
    res = invoke("eval", run, "--dev", store.path, "--split", "train", "--quiet", "--no-save")
    assert res.exit_code == 0 and "train" in res.output and "dev_loss" not in res.output
    res = invoke("eval", run, "--dev", store.path, "--json", "--no-save")
    out = json.loads(res.stdout)
    assert out["dev"] == out["losses"]["dev"] and out["dev"]["complete"]


def test_max_pairs_is_a_seeded_choice_per_file(store, tmp_path):
    """--max-pairs N scores N pairs of each longer file, chosen by the seed and the file's name alone, and the
    accuracy is exactly that of those pairs scored on their own."""
    from cachekd.minimal_pairs import choose_pairs, read_pairs

    tok = store.load_tokenizer()
    model = tiny_model(store.vocab_size)
    d = _demo_pair_dir(tmp_path / "pairs", 9)
    _write_jsonl(d / "short.jsonl", demo_data.generate_minimal_pairs(2, seed=3)["transitive"])
    full = minimal_pair_accuracy(model, tok, d, progress=False)
    r = minimal_pair_accuracy(model, tok, d, progress=False, max_pairs=4, seed=7)
    assert r["max_pairs"] == 4 and r["seed"] == 7 and "max_pairs=4 seed=7" in r["key"] and r["key"] != full["key"]
    assert {f: v["num_pairs"] for f, v in r["by_file"].items()} == {
        **{uid: 4 for uid in demo_data.PHENOMENA}, "short": 2}
    assert all(v["num_pairs_in_file"] == (2 if f == "short" else 9) for f, v in r["by_file"].items())
    for stem in ("transitive", "short"):
        recs = read_pairs(d / f"{stem}.jsonl")
        chosen = choose_pairs(recs, stem, 4, seed=7)
        assert chosen == choose_pairs(recs, stem, 4, seed=7) and len(chosen) == min(4, len(recs))
        assert all(c in recs for c in chosen) and len({json.dumps(c) for c in chosen}) == len(chosen)
        alone = minimal_pair_accuracy(model, tok, _write_jsonl(tmp_path / "alone" / f"{stem}.jsonl", chosen),
                                      progress=False)
        assert alone["by_file"][stem]["num_correct"] == r["by_file"][stem]["num_correct"]
    seeds = {tuple(json.dumps(c) for c in choose_pairs(read_pairs(d / "transitive.jsonl"), "transitive", 4, seed=s))
             for s in range(6)}
    assert len(seeds) > 1  # the seed changes the choice
    res = invoke("eval", make_run(tmp_path, "run", model, tok), "--minimal-pairs", d, "--max-pairs", 4,
                 "--pair-seed", 7, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["minimal_pairs"]["by_file"] == r["by_file"]
    assert_one_clean_error(invoke("eval", tmp_path / "run", "--minimal-pairs", d, "--max-pairs", 0), "max-pairs")
    res = invoke("eval", tmp_path / "run", "--dev", store.path, "--max-pairs", 5)
    assert res.exit_code == 2 and "give the pairs too" in res.output


def test_dev_loss_builds_no_graph(stores):
    """The dev loss is a measurement: no autograd graph (memory) and no gradients on the model afterwards."""
    from cachekd.dev_loss import dev_loss as the_dev_loss

    store, _ = stores
    model = tiny_model(store.vocab_size)
    assert torch.is_grad_enabled()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Converting a tensor with requires_grad=True to a scalar" would raise
        res = the_dev_loss(model, store, split="dev", batch_size=4, progress=False)
    assert res["num_tokens"] > 0 and all(p.grad is None for p in model.parameters())
