"""Running a cohort and searching for its peers: the library side of `cachekd cohort` and `cachekd cohort search`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cachekd.cohort.config import CohortConfig, peer_configs
from cachekd.errors import CachekdError, ConfigKeysError


def check_peers(cohort: CohortConfig, configs: list[Any]) -> None:
    """Refuse, before anything is written, a cohort without peers or a peer that does not fit the token store (a
    checkpoint to start from with another tokenizer, a smaller vocabulary, or without a tokenizer extra output rows
    that carry mass: `cachekd.teachers.check_vocabulary`, the rule precompute applies to a teacher; each peer's
    `Student` says what could not be checked)."""
    from cachekd.models import load_model, resolve_model_dir
    from cachekd.teachers import check_vocabulary
    from cachekd.tokens import TokenStore

    if not configs:
        raise CachekdError("the cohort lists no peers: add at least one under `peers:`.")
    if not cohort.output:
        raise ConfigKeysError("no cohort directory given: pass {output} or set output in the cohort config.")
    store = TokenStore.open(configs[0].data.store)
    for cfg in configs:
        if cfg.model.init_from is None:
            continue
        d = resolve_model_dir(cfg.model.init_from)
        check_vocabulary(
            f"peer {cfg.name!r}'s checkpoint to start from", d, load_model(d), store,
            tokenizer_error=lambda fp, n=cfg.name: (f"peer {n!r} starts from a checkpoint with another tokenizer than "
                                                    f"the token store {str(store.path)!r}."),
            vocab_error=lambda v, n=cfg.name: (f"peer {n!r} starts from a checkpoint with a vocabulary of {v} tokens "
                                               f"but the token store has {store.vocab_size}."),
            advice="start from a checkpoint trained with this store's tokenizer (and save that tokenizer next to it)")


def run_cohort(cohort: CohortConfig, *, resume: bool = False, force: bool = False, progress: bool = True,
               say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the cohort (a variant grid, or weighted mutual learning); returns the cohort summary. Stopped by
    SIGINT/SIGTERM in a single process, it raises `cachekd.trainer.TrainingInterrupted` after a checkpoint."""
    from cachekd.cohort.trainer import CohortTrainer

    configs = peer_configs(cohort)
    check_peers(cohort, configs)
    return CohortTrainer(cohort, configs, resume=resume, force=force, progress=progress, say=say).train()


# ------------------------------------------------------------------------------------------------- search

SEARCH_DIR = "search"
SEARCH_FILE = "search.json"


def candidate_config(cohort: CohortConfig, shape, rung) -> Any:
    """The run config of one search candidate: the cohort's data and optimizer, the shape, the rung's steps."""
    from cachekd.train_config import load_train_config

    out = Path(cohort.output) / SEARCH_DIR / f"r{rung.index}-{shape.name}"
    optim = {k: v for k, v in cohort.optim.items() if k not in ("epochs", "max_time_s")}
    return load_train_config({
        "name": f"{shape.name}@{rung.steps}", "output": str(out), "seed": cohort.seed, "device": cohort.device,
        "precision": cohort.precision, "data": {**cohort.data, "order_seed": cohort.seed},
        "model": {"arch": "llama", "hidden_size": shape.hidden_size, "num_layers": shape.num_layers,
                  "num_heads": shape.num_heads, "intermediate_size": shape.intermediate_size},
        "optim": {**optim, "max_steps": rung.steps}, "log_every": cohort.log_every, "save_every": cohort.save_every,
        "keep_checkpoints": 1,
    })


def _train_candidate(cfg: Any, progress: bool) -> float:
    """A candidate's final dev loss: from its finished run, or by training (resuming an interrupted one)."""
    from cachekd.rundir import RunDir
    from cachekd.trainer import run

    rd = RunDir(cfg.output)
    if rd.finished:
        summary = rd.read_summary()
    else:
        resume = rd.last_checkpoint is not None
        summary = run(cfg, resume=resume, force=not resume and rd.exists, progress=progress)
    # the whole dev split, or the same fixed sample of data.eval_windows windows for every candidate
    dev = summary.get("final_dev_loss", summary.get("final_dev_loss_sample"))
    if dev is None:
        raise CachekdError("peer search ranks candidates by dev loss, but the token store has no dev split.")
    return float(dev)


def run_search(cohort: CohortConfig, *, progress: bool = True, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Successive halving over a seeded random pool of shapes (`cachekd.cohort.search`); resumable: finished
    candidates are read back, an interrupted one resumes from its checkpoint. Writes <output>/search/search.json
    and returns it: the rungs with every candidate's dev loss, the steps spent and the `keep` best shapes."""
    from cachekd.cohort.search import Rung, best_distinct, candidate_shapes, next_rung, rung_cost, sample_shapes
    from cachekd.io import atomic_write_json
    from cachekd.tokens import TokenStore

    s = cohort.search
    if s is None:
        raise CachekdError("cohort search needs a `search:` section in the cohort config.")
    say = say or (lambda msg: None)
    store = TokenStore.open(cohort.data.get("store", ""))
    space = candidate_shapes(layers=(s.layers[0], s.layers[1]), heads=tuple(s.heads), hidden_sizes=tuple(s.hidden_sizes),
                             vocab_size=store.vocab_size, min_params=s.min_params, max_params=s.max_params)
    if len(space) < s.keep:
        raise CachekdError(f"the search space holds {len(space)} shapes within [{s.min_params}, {s.max_params}] "
                           f"parameters, fewer than keep={s.keep}; widen the range or the layers/heads/hidden_sizes.")
    rung: Rung | None = Rung(0, s.rung_steps, tuple(sample_shapes(space, s.pool, cohort.seed)))
    rungs, spent, losses = [], 0, {}
    while rung is not None:
        if s.budget_steps is not None and spent + rung_cost(rung) > s.budget_steps and rungs:
            say(f"peer search: the budget of {s.budget_steps} steps is spent after rung {rung.index - 1}.")
            break
        losses = {}
        for shape in rung.shapes:
            losses[shape] = _train_candidate(candidate_config(cohort, shape, rung), progress)
        spent += rung_cost(rung)
        rungs.append({"rung": rung.index, "steps": rung.steps,
                      "candidates": [{"shape": sh.name, "dev_loss": losses[sh]} for sh in rung.shapes]})
        say(f"peer search: rung {rung.index} ({len(rung.shapes)} shapes x {rung.steps} steps) done.")
        rung = next_rung(rung, losses, keep=s.keep)
    best = best_distinct(losses, s.keep)
    result = {"method": "successive halving over a seeded random pool", "seed": cohort.seed,
              "space_size": len(space), "steps_spent": spent, "rungs": rungs,
              "best": [{"shape": b.name, "dev_loss": losses[b], "model": {
                  "hidden_size": b.hidden_size, "num_layers": b.num_layers, "num_heads": b.num_heads,
                  "intermediate_size": b.intermediate_size}} for b in best]}
    atomic_write_json(Path(cohort.output) / SEARCH_DIR / SEARCH_FILE, result)
    return result
