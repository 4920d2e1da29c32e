"""Bad inputs a user meets (issue 14, beyond cache and token-store storage): each is one sentence and a non-zero
exit, no traceback, nothing written or lost; and the states a stopped process leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import assert_clean_error, invoke

TINY_CLI = ["--set", "model.hidden_size=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
            "--set", "model.intermediate_size=32", "--batch-size", "8", "--max-steps", "2", "--quiet"]


# ------------------------------------------------------------------------------------------- run directories


def test_resume_of_a_missing_or_empty_run_directory_is_refused(tmp_path, runner, store_path):
    """A typo in --output with --resume used to start a new run from step 0."""
    r = invoke(runner, ["train", "--store", store_path, "-o", tmp_path / "typo", "--resume", *TINY_CLI])
    assert_clean_error(r, "nothing to resume", "typo", "no such directory")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    r = invoke(runner, ["train", "--store", store_path, "-o", tmp_path / "empty", "--resume", *TINY_CLI])
    assert_clean_error(r, "nothing to resume", "it is empty")
    assert not any((tmp_path / "empty").iterdir())


def test_model_files_get_the_usual_mode(tmp_path, runner, store_path):
    """save_pretrained writes model.safetensors owner-only (0600); every file of model/ gets open()'s mode."""
    mask = os.umask(0o022)
    os.umask(mask)
    r = invoke(runner, ["train", "--store", store_path, "-o", tmp_path / "run", *TINY_CLI])
    assert r.exit_code == 0, r.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in sorted(Path(tmp_path / "run" / "model").iterdir())}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


# ------------------------------------------------------------------------------------------------ teachers


def _short_teacher(store_path: Path, out: Path, arch: str, positions: int) -> Path:
    """A teacher of the store's tokenizer that takes only `positions` positions (the store's windows are 16)."""
    import torch

    from cachekd.models import ModelConfig, build_model
    from cachekd.tokens import TokenStore

    st = TokenStore.open(store_path)
    torch.manual_seed(0)
    m = build_model(ModelConfig(arch=arch, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                    st.vocab_size, positions)
    m.save_pretrained(out)
    st.load_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("arch,key", [("gpt2", "n_positions"), ("llama", "max_position_embeddings")])
def test_teacher_with_fewer_positions_than_the_window_is_refused(tmp_path, runner, store_path, arch, key):
    """GPT-2 failed with an IndexError after creating the cache; a LLaMA was accepted silently."""
    teacher = _short_teacher(store_path, tmp_path / "short", arch, 8)
    assert f'"{key}": 8' in (teacher / "config.json").read_text()
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher, "-o", tmp_path / "cache", "--quiet"])
    assert_clean_error(r, "teacher 'short' takes at most 8 positions", "windows are 16 tokens")
    assert not (tmp_path / "cache").exists()
    r = invoke(runner, ["distill", "--store", store_path, "--online", "--teacher", teacher, "-o", tmp_path / "run",
                        *TINY_CLI])
    assert_clean_error(r, "at most 8 positions", "16 tokens")
    assert not (tmp_path / "run").exists()


def test_eval_and_init_from_with_fewer_positions_are_refused(tmp_path, runner, store_path, teacher_path):
    short = _short_teacher(store_path, tmp_path / "short", "llama", 8)
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", tmp_path / "cache",
                        "--quiet", "--top-k", "4", "--splits", "dev"])
    assert r.exit_code == 0, r.output
    r = invoke(runner, ["eval", short, "--against-cache", tmp_path / "cache", "--quiet"])
    assert_clean_error(r, "at most 8 positions", "16 tokens")
    r = invoke(runner, ["train", "--store", store_path, "-o", tmp_path / "run", "--set", f"model.init_from={short}",
                        "--max-steps", "1", "--quiet"])
    assert_clean_error(r, "model.init_from", "at most 8 positions", "16 tokens")
    assert not (tmp_path / "run").exists()


def _untokenized_teacher(store_path: Path, out: Path, extra: int, padding: bool) -> Path:
    """A teacher with `extra` more outputs than the store's vocabulary and no tokenizer saved with it. `padding`:
    the extra rows are zero and the real ones peaked (final norm scaled up), so the extra rows carry ~no mass."""
    import torch

    from cachekd.models import ModelConfig, build_model
    from cachekd.tokens import TokenStore

    st = TokenStore.open(store_path)
    torch.manual_seed(0)
    m = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                    st.vocab_size + extra, st.seq_len)
    if padding:
        with torch.no_grad():
            m.lm_head.weight[st.vocab_size:] = 0
            m.model.norm.weight.mul_(1000)
    m.save_pretrained(out)
    return out


def test_padding_mass_matches_float64(tmp_path):
    import torch

    from cachekd.teachers import padding_mass

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 40, generator=g) * 4
    z[0, 0, 30:] = -30  # a position where the extra rows carry almost nothing
    got = padding_mass(z, 30)
    p = torch.softmax(z.double(), dim=-1)
    ref = torch.tensor([[sum(float(p[b, t, v]) for v in range(30, 40)) for t in range(5)] for b in range(3)],
                       dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-12)


def test_extra_rows_without_a_tokenizer_are_measured(tmp_path, runner, store_path):
    """1000 extra rows and no tokenizer: dropped silently before. Now refused when they carry probability, and
    said at precompute when they are padding."""
    from cachekd.cache.reader import LogitCache
    from cachekd.teachers import PADDING_MASS_LIMIT

    real = _untokenized_teacher(store_path, tmp_path / "real", 1000, padding=False)
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", real, "-o", tmp_path / "c1", "--quiet"])
    assert_clean_error(r, "1000 more than the token store's vocabulary", "no tokenizer", f"more than the "
                       f"{PADDING_MASS_LIMIT:g}", "real tokens")
    assert not (tmp_path / "c1").exists()
    r = invoke(runner, ["distill", "--store", store_path, "--online", "--teacher", real, "-o", tmp_path / "run",
                        *TINY_CLI])
    assert_clean_error(r, "no tokenizer", "real tokens")
    padded = _untokenized_teacher(store_path, tmp_path / "padded", 1000, padding=True)
    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", padded, "-o", tmp_path / "c2", "--quiet",
                        "--top-k", "4"])
    assert r.exit_code == 0, r.output
    assert "1000 more than the token store's vocabulary" in r.stderr and "dropped as padding" in r.stderr, r.stderr
    t = LogitCache.open(tmp_path / "c2").meta["teachers"][0]
    assert t["padded_logits_dropped"] == 1000 and 0 <= t["padding_mass"] < PADDING_MASS_LIMIT


# ------------------------------------------------------------------------------------------------ signals

SLOW_IMPORT = """
import builtins, runpy, sys, time
real_import = builtins.__import__
def slow_import(name, *args, **kwargs):
    if name == "cachekd_cli.main":
        print("importing the commands", flush=True)
        time.sleep(30)
    return real_import(name, *args, **kwargs)
builtins.__import__ = slow_import
sys.argv = ["cachekd", "presets"]
runpy.run_module("cachekd_cli", run_name="__main__")
"""


def test_ctrl_c_while_the_commands_are_imported_exits_quietly():
    """A Ctrl-C in the first moments (while the imports run) gave a KeyboardInterrupt traceback; it exits 130."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", SLOW_IMPORT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "importing the commands", proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


BUSY_LOADER_CLI = """
import sys, torch
import cachekd.loader as loader
read_batch = loader.WindowSource.batch
A = torch.randn(600, 600)
def busy_batch(self, window_ids):
    for _ in range(3):
        torch.mm(A, A)  # keeps the loader thread inside torch code (the GIL released) most of the time
    return read_batch(self, window_ids)
loader.WindowSource.batch = busy_batch
from cachekd_cli.entry import main
sys.argv[0] = "cachekd"
main()
"""


def test_sigterm_during_distill_exits_143_every_time(tmp_path, runner, store_path, teacher_path):
    """The loader's prefetch thread was stopped but not joined: when the interpreter exited while it was inside torch
    code, the process aborted ("terminate called without an active exception", exit 134 instead of 143), once in
    ~30 SIGTERMs on a loaded machine. Here the thread is kept busy in torch code, five distills run at once (load),
    and each of the 5 SIGTERMs must give 143, the checkpoint and no abort."""
    import signal
    import subprocess
    import sys
    import time

    r = invoke(runner, ["precompute", "--store", store_path, "--teacher", teacher_path, "-o", tmp_path / "cache",
                        "--quiet", "--top-k", "4", "--splits", "train"])
    assert r.exit_code == 0, r.output
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for i in range(5):
        out = tmp_path / f"run{i}"
        args = ["distill", "--store", str(store_path), "--cache", str(tmp_path / "cache"), "-o", str(out),
                *TINY_CLI[:-3], "--max-steps", "100000", "--set", "data.prefetch=1", "--device", "cpu", "--quiet"]
        procs.append((out, subprocess.Popen([sys.executable, "-c", BUSY_LOADER_CLI, *args], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    try:
        for out, proc in procs:
            deadline = time.monotonic() + 120
            while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "no training progress"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        for out, proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr[-2000:])
            assert "Stopped by SIGTERM" in stderr and "terminate called" not in stderr, stderr[-2000:]
            assert "Traceback" not in stderr + stdout, stderr[-2000:]
            assert list((out / "checkpoints").glob("step_*.pt")), list(out.rglob("*"))
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()


# ------------------------------------------------------------------------------------------------ prepare


def test_prepare_refuses_a_vocabulary_beyond_the_maximum(tmp_path, corpus):
    """--vocab-size 1000000000 made the tokenizer trainer allocate ~70 GB and abort the process (so this runs the CLI
    in a subprocess)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cachekd_cli", "prepare", str(corpus), "-o", str(tmp_path / "s"),
                        "--vocab-size", "1000000000", "--seq-len", "16", "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert r.stderr.strip() == ("Error: --vocab-size must be at most 1,048,576 (got 1,000,000,000), four times the "
                                "largest vocabularies in use; Baby Llama uses 16,000."), r.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_a_command_that_opens_no_store_exits_without_a_traceback():
    """`cachekd prepare --help` printed a traceback at exit: closing the object stores' sessions imported zarr after
    shutdown had begun."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cachekd_cli", "prepare", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]


def test_prepare_refuses_an_output_inside_an_input(tmp_path, runner, corpus):
    """An output inside its input directory was read back as corpus by the next run (--force)."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(corpus, data / "corpus.txt")
    args = ["--vocab-size", "300", "--seq-len", "16", "--quiet"]
    r = invoke(runner, ["prepare", data, "-o", data / "store", *args])
    assert_clean_error(r, "inside the input directory", "choose an output outside the inputs")
    r = invoke(runner, ["prepare", data, "-o", data, *args])
    assert_clean_error(r, "inside the input directory")
    assert sorted(p.name for p in data.iterdir()) == ["corpus.txt"]
    # a file input next to the output is fine; a glob that reaches into the output is not
    r = invoke(runner, ["prepare", data / "corpus.txt", "-o", data / "store", *args])
    assert r.exit_code == 0, r.output
    r = invoke(runner, ["prepare", data / "corpus.txt", str(data / "**" / "*.json"), "-o", data / "store", "--force",
                        *args])
    assert_clean_error(r, "is inside the output")


# ------------------------------------------------------------------------------------------------ eval


def test_malformed_minimal_pair_json_names_file_line_and_column(tmp_path, runner, teacher_path):
    """The message was only json's "Unterminated string starting at"."""
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    good = '{"sentence_good": "the dog sat .", "sentence_bad": "the dog sat sat ."}'
    cut = '{"sentence_good": "the dog sat .", "sentence_bad": "the dog'
    (pairs / "agreement.jsonl").write_text(f"{good}\n{cut}\n")
    r = invoke(runner, ["eval", teacher_path, "--minimal-pairs", pairs, "--quiet", "--no-save"])
    assert_clean_error(r, "agreement.jsonl' line 2 is not valid JSON",
                       f"(Unterminated string starting at column {cut.rindex(chr(34)) + 1})")
    (pairs / "agreement.jsonl").write_text(f'{good}\n{good[:-1]} "field": }}\n')
    r = invoke(runner, ["eval", teacher_path, "--minimal-pairs", pairs, "--quiet", "--no-save"])
    assert_clean_error(r, "line 2 is not valid JSON (Expecting ',' delimiter at column 72)")


# ------------------------------------------------------------------------------------------------ configs

CONFIG_CHECK = """
import sys
from click.testing import CliRunner
from cachekd_cli.main import cli
r = CliRunner().invoke(cli, sys.argv[1:])
print(r.exit_code, "torch" in sys.modules)
print(r.output.strip())
"""


def _config_error(*args: str) -> tuple[int, bool, str]:
    """(exit code, whether torch was imported, output) of the CLI run in a fresh process."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", CONFIG_CHECK, *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    first, output = r.stdout.split("\n", 1)
    code, torch_imported = first.split()
    return int(code), torch_imported == "True", output


def test_an_empty_config_is_refused(tmp_path, runner, store_path):
    """An empty YAML given with -c trained a 44M-parameter default model."""
    for text in ("", "# nothing here yet\n", "{}\n"):
        (tmp_path / "empty.yaml").write_text(text)
        r = invoke(runner, ["train", "-c", tmp_path / "empty.yaml", "--store", store_path, "-o", tmp_path / "run",
                            "--max-steps", "1", "--quiet"])
        assert_clean_error(r, "empty.yaml holds no options", "cachekd presets")
        assert not (tmp_path / "run").exists()


def test_config_errors_come_before_torch_is_imported(tmp_path, store_path):
    """A config error took ~3 s because the trainer (and torch) was imported before the config was checked."""
    (tmp_path / "x.yaml").write_text(f"data:\n  store: {store_path}\noutput: {tmp_path / 'run'}\n")
    code, torch_imported, out = _config_error("distill", "-c", tmp_path / "x.yaml", "--alpha", "2")
    assert code != 0 and not torch_imported and "distill.alpha (--alpha) must be in [0, 1]" in out, out
    (tmp_path / "empty.yaml").write_text("")
    code, torch_imported, out = _config_error("train", "-c", tmp_path / "empty.yaml")
    assert code != 0 and not torch_imported and "holds no options" in out, out
    code, torch_imported, out = _config_error("train", "-c", tmp_path / "x.yaml", "--set", "model.num_heads=0")
    assert code != 0 and not torch_imported and "model.num_heads" in out, out
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- docs/reliability.md


def test_reliability_table_names_existing_tests_and_states_its_count():
    """docs/reliability.md's table of bad inputs: every test it names exists, and its count is the sum of `n`."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "reliability.md").read_text(encoding="utf-8")
    section = ("\n" + text).split("\n# Reliability\n", 1)[1].split("\n## ", 1)[0]
    rows = [ln.split("|")[1:-1] for ln in section.splitlines() if ln.startswith("| ")]
    rows = [r for r in rows if not r[0].strip().startswith("**") and r[0].strip() != "Bad input"]
    assert rows and all(len(r) == 4 for r in rows), rows
    stated = int(re.search(r"\*\*(\d+) bad\s+inputs\*\*", section).group(1))
    assert stated == sum(int(r[1]) for r in rows)
    for name in sorted(set(re.findall(r"`(test_\w+)::(test_\w+)`", section))):
        source = (root / "tests" / f"{name[0]}.py").read_text(encoding="utf-8")
        assert re.search(rf"^def {name[1]}\(", source, re.M), name
