"""A run directory: what `cachekd train` / `cachekd distill` write, and the one rule for what state it is in.

Layout (every name here; nothing else in cachekd spells them)::

    RUN/config.yaml        the run's config, written when it starts (its presence makes RUN a run)
    RUN/metrics.jsonl      one JSON object a line: {"kind": "train" | "dev", "step", ...}
    RUN/checkpoints/       step_00000042.pt, ... (resumable state; see `cachekd.checkpoint`)
    RUN/running.json       {pid, host, started} while a process trains the run, which holds a lock on it (flock, dropped
                           by the kernel however the process ends); removed when it stops
    RUN/model/             the final HF checkpoint (model + tokenizer), written at the end
    RUN/summary.json       written last: its presence means the run finished
    RUN/eval.json          `cachekd eval`'s results, merged by what was measured (`save_eval`)
    RUN/tensorboard/       with `tensorboard: true`

State (`RunDir.state`): ``empty`` (no directory, or nothing in it but a running.json), ``foreign`` (files, but no
run), ``finished`` (summary.json), ``running`` (unfinished and a live process trains it) or ``unfinished`` (stopped,
crashed or killed: `--resume` continues it). A run is a directory with config.yaml, metrics.jsonl or summary.json in
it. A process claims a run before it writes anything there (`RunDir.claim`), and every command that would train or
replace a run another process has claimed is refused (`RunDir.plan_start`).

One `RunDir` per student: a cohort of N students trained in one loop has N run directories.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cachekd.errors import CachekdError, ConfigKeysError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
"""Where `cachekd eval` saves its result inside a run directory (read by `cachekd compare`).

Its losses are kept apart by what was measured: ``"losses"`` maps a key (`loss_key`: ``"dev"`` for the whole dev
split, ``"train:first50"`` for the first 50 train windows, ...) to each measurement, and the top-level ``"dev"`` is
only ever the whole dev split, the one number `cachekd compare` reports as a run's dev loss. Minimal-pair results are
kept the same way: ``"minimal_pairs_results"`` maps `minimal_pairs_key` (file set, prefix convention, pair limit) to
each result, so scoring other files, or the same files with another prefix, never replaces an earlier result."""
RUNNING_FILE = "running.json"
"""{pid, host, started, lock} of the process training the run right now, which holds an exclusive flock on the file
(`RunDir.claim`); removed when it stops. A run whose file is locked is refused to every other command that would
train it (`plan_start`), and `cachekd compare` tells a live run from an unfinished one with it."""
MODEL_DIR = "model"
MODEL_TMP_DIR = ".model.tmp"
CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"

RUN_FILES = (MODEL_DIR, MODEL_TMP_DIR, CHECKPOINTS_DIR, METRICS_FILE, CONFIG_FILE, SUMMARY_FILE, EVAL_FILE,
             TENSORBOARD_DIR, RUNNING_FILE)
"""Everything cachekd writes into a run directory (`cachekd eval` adds eval.json); --force removes only these."""

_RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)
"""Files whose presence makes a directory a run (config.yaml and metrics.jsonl are written when it starts)."""

LIVE_METRICS_S = 600.0
"""A run trained on another machine counts as running while its metrics.jsonl changed this recently."""

RunState = Literal["empty", "foreign", "unfinished", "running", "finished"]

_CLAIMS: dict[str, list[Any]] = {}
"""The runs this process has claimed (`RunDir.claim`): resolved path -> [running.json open and locked, count]."""


@dataclass(frozen=True)
class StartPlan:
    """How a training command begins in a run directory (`RunDir.plan_start`).

    ``new``: create the run (after removing an old one when ``replace``); ``restart``: a run stopped before its
    first checkpoint starts again from step 0 with the same config; ``resume``: load ``checkpoint``."""

    action: Literal["new", "restart", "resume"]
    replace: bool = False
    checkpoint: Path | None = None


def _in_run(name: str) -> property:
    """A read-only attribute: the path of `name` inside the run directory."""
    return property(lambda self: self.path / name, doc=f"``RUN/{name}``")


class RunDir:
    """One run directory: its layout, its state and the files cachekd keeps in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------ layout
    config_path = _in_run(CONFIG_FILE)
    metrics_path = _in_run(METRICS_FILE)
    summary_path = _in_run(SUMMARY_FILE)
    eval_path = _in_run(EVAL_FILE)
    running_path = _in_run(RUNNING_FILE)
    model_dir = _in_run(MODEL_DIR)
    checkpoint_dir = _in_run(CHECKPOINTS_DIR)
    tensorboard_dir = _in_run(TENSORBOARD_DIR)

    @classmethod
    def of_model_path(cls, path: str | Path) -> RunDir | None:
        """The run a model path belongs to: `path` itself when it holds ``model/``, the parent when `path` is a
        run's ``model/`` directory; None for a bare checkpoint."""
        p = Path(path)
        if (p / MODEL_DIR / "config.json").exists():
            return cls(p)
        if p.name == MODEL_DIR and cls(p.parent).is_run:
            return cls(p.parent)
        return None

    # ------------------------------------------------------------------------------------------- state
    @property
    def exists(self) -> bool:
        """Whether the directory is there and holds anything (but a running.json left by a claim)."""
        return self.path.is_dir() and any(p.name != RUNNING_FILE for p in self.path.iterdir())

    @property
    def is_run(self) -> bool:
        """Whether cachekd started a run here (config.yaml, metrics.jsonl or summary.json is there)."""
        return any((self.path / name).exists() for name in _RUN_MARKERS)

    @property
    def finished(self) -> bool:
        """summary.json is written last: its presence means the run ended."""
        return self.summary_path.exists()

    def checkpoints(self) -> list[Path]:
        """The step checkpoints, oldest first (their names sort by step)."""
        return sorted(self.checkpoint_dir.glob("step_*.pt")) if self.checkpoint_dir.is_dir() else []

    def drop_checkpoints_after(self, step: int) -> None:
        """Delete the checkpoints of steps after `step` (a resume from an earlier step abandons them)."""
        for p in self.checkpoints():
            if checkpoint_step(p) > step:
                p.unlink()

    @property
    def last_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    @property
    def last_checkpoint_step(self) -> int | None:
        last = self.last_checkpoint
        return checkpoint_step(last) if last is not None else None

    def running_info(self) -> dict[str, Any]:
        """What running.json says ({pid, host, started, lock}); {} when it is missing or unreadable."""
        try:
            info = json.loads(self.running_path.read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def is_running(self) -> bool:
        """Whether a process is training this run now: it holds the lock on ``running.json`` (`claim`; a file
        written before the lock, by an older cachekd: names a live process on this machine), or, from another
        machine, its metrics changed in the last LIVE_METRICS_S seconds. A crashed or killed run leaves a stale
        file: its lock is gone with its process."""
        from cachekd.storage import flock_held

        if self._key() in _CLAIMS:
            return True
        info = self.running_info()
        try:
            pid, host = int(info["pid"]), str(info["host"])
        except (KeyError, TypeError, ValueError):  # missing, or being written by a claim right now
            return flock_held(self.running_path)
        if host != socket.gethostname():
            try:
                return time.time() - self.metrics_path.stat().st_mtime < LIVE_METRICS_S
            except OSError:
                return False
        if info.get("lock"):
            return flock_held(self.running_path)
        return _process_lives(pid)

    def running_elsewhere(self) -> bool:
        """Whether another process than this one is training the run now (`is_running`)."""
        info = self.running_info()
        if self._key() in _CLAIMS or (info.get("pid") == os.getpid() and not info.get("lock")):
            return False  # claimed by this process, or an unlocked file naming it
        return self.is_running()

    def live_message(self) -> str:
        """Why no other command may train or replace this run now, in one sentence."""
        info = self.running_info()
        who = f"pid {info['pid']} on {info.get('host', '?')}" if "pid" in info else "another process"
        since = f", started {info['started']}" if info.get("started") else ""
        return (f"the run in {str(self.path)!r} is being trained right now ({who}{since}); wait for it to end or stop "
                f"it before running another command that trains or replaces it.")

    @property
    def state(self) -> RunState:
        """empty / foreign / finished / running / unfinished: the one rule every command uses."""
        if not self.exists:
            return "empty"
        if not self.is_run:
            return "foreign"
        if self.finished:
            return "finished"
        return "running" if self.is_running() else "unfinished"

    def saved_command(self) -> str:
        """`distill` or `train`: the command that wrote this run (from its config.yaml)."""
        cfg = self.read_config_mapping(strict=False)
        return "distill" if cfg.get("distill") else "train"

    def read_config_mapping(self, strict: bool = True) -> dict[str, Any]:
        """config.yaml as a mapping; with `strict`, an unreadable file raises (OSError, yaml.YAMLError, or
        CachekdError when it is not a mapping), otherwise it reads as {}."""
        import yaml

        try:
            data = yaml.safe_load(self.config_path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            if strict:
                raise
            return {}
        if not isinstance(data, dict):
            if strict:
                raise CachekdError(f"{str(self.config_path)!r} is not a mapping of config sections.")
            return {}
        return data

    def unfinished_message(self) -> str:
        """For a run without model/ yet (or any more): say how to finish it."""
        command, config = self.saved_command(), self.config_path
        step = self.last_checkpoint_step
        if self.finished:
            fix = ("--resume` writes it again from the last checkpoint" if step is not None
                   else "--force` trains it again")
            return (f"{str(self.path)!r} is a finished cachekd run but its model/ is missing: "
                    f"`cachekd {command} -c {config} {fix}.")
        where = f" (last checkpoint: step {step})" if step is not None else ""
        if self.running_elsewhere():
            return (f"{str(self.path)!r} is a cachekd run being trained right now, so it has no model/ yet{where}: "
                    f"evaluate it once it has finished.")
        return (f"{str(self.path)!r} is a cachekd run that has not finished, so it has no model/ yet{where}: finish it "
                f"with `cachekd {command} -c {config} --resume`, or evaluate a finished run or an HF checkpoint.")

    # ---------------------------------------------------------------------------------- starting a run
    def plan_start(self, *, resume: bool, force: bool, check_live: bool = True) -> StartPlan:
        """How `train`/`distill` with `--resume` / `--force` begin here, or a CachekdError saying why they cannot:
        with `check_live`, whatever the options, while another process trains the run (`running_elsewhere`)."""
        out = str(self.path)
        if check_live and self.running_elsewhere():
            raise CachekdError(self.live_message())
        finished = self.finished
        if resume and finished:
            raise ConfigKeysError("the run in {out!r} already finished; nothing to resume (pass {force} to train it "
                                  "again, or choose another output).", out=out)
        if resume and not self.exists:
            raise ConfigKeysError("there is nothing to resume in {out!r}: {why}; check the path, or leave out "
                                  "{resume} to start a new run there.", out=out,
                                  why="it is empty" if self.path.is_dir() else "no such directory")
        last = self.last_checkpoint if self.path.exists() else None
        if resume and last is not None:
            return StartPlan("resume", checkpoint=last)
        exists, is_run = self.exists, self.is_run
        if resume and exists:
            if not is_run:
                raise CachekdError(f"{out!r} is not a cachekd run, so there is nothing to resume; "
                                   f"choose another output.")
            return StartPlan("restart")
        if exists and not resume:
            if not is_run:
                raise CachekdError(f"output {out!r} is not empty and is not a cachekd run; choose another path.")
            if not force:
                what = "a finished run" if finished else "an unfinished run"
                hint = "" if finished else " pass {resume} to continue it,"
                raise ConfigKeysError("{out!r} holds {what};" + hint + " pass {force} to start over, or choose another "
                                      "output.", out=out, what=what)
            return StartPlan("new", replace=True)
        return StartPlan("new")

    def create(self, config: Any) -> None:
        """Make the directory, save the config (a dataclass) as config.yaml and start an empty metrics.jsonl."""
        from cachekd.config import save_yaml

        self.path.mkdir(parents=True, exist_ok=True)
        save_yaml(self.config_path, config)
        self.reset_metrics()

    def remove_run_files(self) -> list[str]:
        """Delete what cachekd wrote here (RUN_FILES, and temporary files of cut-off atomic writes); return the
        names of the other entries, left in place (--force)."""
        kept = []
        for entry in sorted(self.path.iterdir()):
            # also the temporary file of an atomic write cut off by a crash (".summary.json.x1y2.tmp")
            ours = entry.name in RUN_FILES or (entry.name.endswith(".tmp") and any(
                entry.name.startswith(f".{name}.") for name in RUN_FILES))
            if entry.name == RUNNING_FILE and self._key() in _CLAIMS:
                continue  # this process's claim: removing it would let another process claim the run
            if ours:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            else:
                kept.append(entry.name)
        return kept

    def claim(self) -> None:
        """Mark the run as trained by this process until `release`: an exclusive lock (flock) on running.json,
        which names the process; the kernel drops the lock however the process ends. Creates the directory. A run
        another process has claimed is refused (CachekdError); a second claim in this process only counts."""
        from cachekd.storage import try_flock

        key = self._key()
        if key in _CLAIMS:
            _CLAIMS[key][1] += 1
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            f = try_flock(self.running_path)
            if f is not None:
                if _same_file(f, self.running_path):
                    break
                f.close()  # its holder removed the file between our open and our lock: lock the new one
            else:
                time.sleep(0.01)  # a probe (`flock_held`) holds the lock for an instant
        else:
            raise CachekdError(self.live_message())
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "lock": "flock",
                            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
        f.flush()
        _CLAIMS[key] = [f, 1]

    def release(self) -> None:
        """End this process's claim (the last of its claims removes running.json and drops the lock)."""
        entry = _CLAIMS.get(self._key())
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _CLAIMS[self._key()]
        f = entry[0]
        try:
            if _same_file(f, self.running_path):
                self.running_path.unlink()
        except OSError:
            pass
        f.close()

    def mark_running(self, on: bool) -> None:
        """`claim` (on) or `release` (off) the run for this process."""
        self.claim() if on else self.release()

    def _key(self) -> str:
        return str(self.path.resolve())

    # ----------------------------------------------------------------------------------------- metrics
    def reset_metrics(self) -> None:
        self.metrics_path.write_text("")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line; a write cut off (a full disk) leaves the file as it was."""
        line = memoryview((json.dumps(record) + "\n").encode())
        with open(self.metrics_path, "ab", buffering=0) as f:
            start = f.tell()
            try:
                while line:
                    line = line[f.write(line):]
            except BaseException:
                f.truncate(start)
                raise

    def truncate_metrics(self, step: int) -> None:
        """Drop the records logged after `step` (a resumed run logs them again), and a last line cut off by a
        crash."""
        if self.metrics_path.exists():
            keep = [json.dumps(rec) for rec in read_metrics(self.metrics_path) if rec.get("step", 0) <= step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path) if self.metrics_path.exists() else []

    # --------------------------------------------------------------------------------- summary and model
    def write_summary(self, summary: dict[str, Any]) -> None:
        from cachekd.io import atomic_write_json

        atomic_write_json(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any]:
        """summary.json, or {} before the run finished; a damaged file raises CachekdError."""
        from cachekd.io import read_json_dict

        return read_json_dict(self.summary_path, "the run's summary is damaged.") if self.finished else {}

    def save_model(self, model: Any, tokenizer: Any) -> None:
        """Write model/ (HF checkpoint plus tokenizer) through a temporary directory, replacing an older one. Its
        files get the usual mode (0644 under umask 022) like every other file of the run."""
        from cachekd.io import give_usual_mode

        tmp = self.path / MODEL_TMP_DIR
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # (a full disk: leave no partial copy)
            raise
        give_usual_mode(tmp)
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)
        os.replace(tmp, self.model_dir)

    # -------------------------------------------------------------------------------------------- eval
    def save_eval(self, result: dict[str, Any]) -> Path:
        return save_eval(result, self.path)

    def load_eval(self) -> dict[str, Any] | None:
        return load_eval(self.path)


# ---------------------------------------------------------------------------------------- helpers


def checkpoint_step(path: Path) -> int:
    """The step a ``step_00000042.pt`` checkpoint holds."""
    return int(path.stem.split("_")[1])


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _same_file(f: Any, path: Path) -> bool:
    """Whether the open file `f` is still the file at `path` (not removed or replaced since it was opened)."""
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _process_lives(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def common_checkpoint_step(runs: list[RunDir]) -> int | None:
    """The last step every run in `runs` holds a checkpoint of; None when they hold none in common."""
    common: set[int] | None = None
    for run in runs:
        steps = {checkpoint_step(p) for p in run.checkpoints()}
        common = steps if common is None else common & steps
    return max(common) if common else None


def run_state(out: str | Path) -> dict[str, Any]:
    """What a run directory holds now: {"exists", "is_run", "finished", "last_checkpoint_step"}; the CLI says
    from it how an interrupted run can go on."""
    run = RunDir(out)
    return {"exists": run.exists, "is_run": run.is_run, "finished": run.finished,
            "last_checkpoint_step": run.last_checkpoint_step}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl file. A cut-off last line (a run writing right now) is skipped; any
    other malformed line raises CachekdError naming the file and line."""
    p = Path(path)
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == last:
                break
            raise CachekdError(f"{str(p)!r} line {i + 1} is not valid JSON; the metrics file is damaged.") from None
        if isinstance(rec, dict):
            out.append(rec)
    return out


# ------------------------------------------------------------------------------------------ eval.json


def loss_key(entry: dict[str, Any]) -> str:
    """What a loss entry measured: the split (``"dev"``), with ``":firstN"`` when only its first N windows were."""
    split = str(entry.get("split", "dev"))
    complete = entry.get("complete")
    if complete is None:  # eval.json written before "complete" was recorded
        complete = entry.get("max_windows") is None
    return split if complete else f"{split}:first{entry.get('num_windows')}"


def full_dev_loss(ev: dict[str, Any] | None) -> dict[str, Any] | None:
    """The loss entry of an eval.json measured on the whole dev split, or None."""
    if not isinstance(ev, dict):
        return None
    entries = [(ev.get("losses") or {}).get("dev"), ev.get("dev")]
    for e in entries:
        if isinstance(e, dict) and loss_key(e) == "dev":
            return e
    return None


def prefix_label(prefix: str | None) -> str:
    """How a prefix convention is shown: ``eos``, ``bos``, ``none`` (no context) or the text, quoted."""
    if prefix is None:
        return "none"
    return prefix if prefix in ("eos", "bos") else json.dumps(prefix, ensure_ascii=False)


def minimal_pairs_key(mp: dict[str, Any]) -> str:
    """What a minimal-pair result measured, e.g. ``blimp#1a2b3c4d prefix=eos`` or ``blimp#1a2b3c4d prefix=bos
    max_pairs=100 seed=0``: the file set (name and content fingerprint), the prefix convention and the pair limit.
    Only results with the same key are comparable. A result saved before these were recorded gets
    ``prefix=unrecorded`` (and no fingerprint), so it is never taken for one of a known convention."""
    name = mp.get("pair_set") or (Path(str(mp["path"])).stem if mp.get("path") else "pairs")
    fp = mp.get("files_fingerprint")
    parts = [f"{name}#{fp[:8]}" if fp else str(name)]
    parts.append("prefix=" + (prefix_label(mp["prefix"]) if "prefix" in mp else "unrecorded"))
    if mp.get("max_pairs") is not None:
        parts.append(f"max_pairs={mp['max_pairs']} seed={mp.get('seed')}")
    return " ".join(parts)


def minimal_pair_results(ev: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Every minimal-pair result of an eval.json (or an `evaluate` result), by `minimal_pairs_key`."""
    if not isinstance(ev, dict):
        return {}
    out: dict[str, dict[str, Any]] = {}
    single = ev.get("minimal_pairs")
    if isinstance(single, dict) and isinstance(single.get("by_file"), dict):  # the latest, or an older eval.json
        out[minimal_pairs_key(single)] = single
    for mp in (ev.get("minimal_pairs_results") or {}).values():
        if isinstance(mp, dict) and isinstance(mp.get("by_file"), dict):
            out[minimal_pairs_key(mp)] = mp
    return dict(sorted(out.items()))


def save_eval(result: dict[str, Any], run_dir: str | Path) -> Path:
    """Merge `result` into ``run_dir/eval.json`` and return its path.

    A loss is stored under ``"losses"`` by what was measured (`loss_key`: split and, for part of a split, the
    number of windows), so a quick ``--split train --max-windows 50`` never replaces the dev-split loss. The top-level
    ``"dev"`` is the whole-dev-split loss only (absent until one is measured). Minimal-pair results are kept under
    ``"minimal_pairs_results"`` by `minimal_pairs_key` (file set, prefix, pair limit): a result replaces only an
    earlier one of the same key; ``"minimal_pairs"`` is the latest of them. Agreement with a cache is replaced by a
    new one. Everything is kept from an earlier result for the same
    checkpoint; a result for another checkpoint (the run was trained again) starts the file afresh."""
    from cachekd.io import atomic_write_json, read_json

    path = Path(run_dir) / EVAL_FILE
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = read_json(path)
        except ValueError:
            old = {}
        if not isinstance(old, dict) or old.get("checkpoint_fingerprint") != result.get("checkpoint_fingerprint"):
            old = {}
    losses: dict[str, Any] = dict(old.get("losses") or {})
    if isinstance(old.get("dev"), dict) and "losses" not in old:  # an eval.json from before the keyed losses
        losses.setdefault(loss_key(old["dev"]), old["dev"])
    merged = {k: v for k, v in result.items() if k not in ("dev", "losses")}
    for entry in [*(result.get("losses") or {}).values(), result.get("dev")]:
        if isinstance(entry, dict):
            losses[loss_key(entry)] = entry
    for key in ("minimal_pairs", "against_cache"):
        if key not in merged and key in old:
            merged[key] = old[key]
    pair_results = minimal_pair_results(old) | minimal_pair_results(result)
    if pair_results:
        merged["minimal_pairs_results"] = pair_results
    if losses:
        merged["losses"] = dict(sorted(losses.items()))
    full = full_dev_loss({"losses": losses})
    if full is not None:
        merged["dev"] = full
    atomic_write_json(path, merged)
    return path


def load_eval(run_dir: str | Path) -> dict[str, Any] | None:
    """``run_dir/eval.json`` or None when there is none; an unreadable file raises CachekdError."""
    from cachekd.io import read_json_dict

    path = Path(run_dir) / EVAL_FILE
    if not path.exists():
        return None
    return read_json_dict(path, "run `cachekd eval` on the run again.")


PEERS_DIR = "peers"
"""Where a cohort directory keeps its peers' run directories."""


def cohort_peer_dirs(path: Any) -> list[Any] | None:
    """The peers' run directories of a cohort directory, in the cohort's order; None when `path` is not one."""
    p = Path(path)
    peers = p / PEERS_DIR
    if not peers.is_dir():
        return None
    cfg = RunDir(p).read_config_mapping(strict=False)
    names = [str(x.get("name")) for x in cfg.get("peers") or [] if isinstance(x, dict) and x.get("name")]
    found = sorted(d.name for d in peers.iterdir() if d.is_dir())
    # the cohort's own peers (a directory left by an earlier cohort with other peers is not one of them)
    return [peers / n for n in (names if names else found) if n in found]
