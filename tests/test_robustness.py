"""Bad inputs a user meets (issue 14, beyond cache and token-store storage): each is one sentence and a non-zero
exit, no traceback, nothing written or lost; and the states a stopped process leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

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
