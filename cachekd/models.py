"""Student and teacher models: built from a small config (LLaMA or GPT-2 shapes) or loaded from any HF checkpoint.

Everything is a real Hugging Face model (`LlamaForCausalLM`, `GPT2LMHeadModel`, any `AutoModelForCausalLM`) and
is saved with `save_pretrained`, so checkpoints go in and out of the wider ecosystem unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cachekd.errors import CachekdError

if TYPE_CHECKING:  # torch is imported where a model is built or loaded: checking a config must not wait for it
    import torch


@dataclass
class ModelConfig:
    """Shape of a model to build from scratch (ignored when `init_from` names a checkpoint)."""

    arch: Literal["llama", "gpt2"] = "llama"
    """Model family: LLaMA (RMSNorm, RoPE, SwiGLU) or GPT-2 (LayerNorm, learned positions, GELU)."""
    hidden_size: int = 512
    num_layers: int = 16
    num_heads: int = 8
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (LLaMA only); None = num_heads."""
    intermediate_size: int = 1024
    """Feed-forward width (LLaMA); GPT-2 uses 4·hidden."""
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_from: str | None = None
    """Start from this HF checkpoint directory instead of a fresh initialisation."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise CachekdError(f"model.{name} must be at least 1 (got {getattr(self, name)}).")
        if self.num_kv_heads is not None and self.num_kv_heads < 1:
            raise CachekdError(f"model.num_kv_heads must be at least 1, or null for num_heads (got {self.num_kv_heads}).")
        if not 0 <= self.dropout < 1:
            raise CachekdError(f"model.dropout must be in [0, 1) (got {self.dropout}).")
        if self.hidden_size % self.num_heads:
            raise CachekdError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads}).")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise CachekdError(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({kv}).")


def build_model(cfg: ModelConfig, vocab_size: int, max_positions: int, special: dict[str, int | None] | None = None):
    """A fresh HF causal LM of the given shape."""
    special = special or {}
    if cfg.init_from:
        return load_model(cfg.init_from)
    if cfg.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=max_positions,
            tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout,
            pad_token_id=special.get("pad"), bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
        )
        return LlamaForCausalLM(hf)
    if cfg.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2Config(
            vocab_size=vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_positions=max_positions, n_inner=None, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings,
            pad_token_id=special.get("pad"), bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
        )
        return GPT2LMHeadModel(hf)
    raise CachekdError(f"unknown model.arch {cfg.arch!r}; choose llama or gpt2.")


def resolve_model_dir(path: str | Path) -> Path:
    """A checkpoint directory: the path itself, or `<run>/model` for an output directory of `cachekd train`."""
    from cachekd.rundir import MODEL_DIR, RunDir

    p = Path(path)
    if (p / MODEL_DIR / "config.json").exists():
        return p / MODEL_DIR
    if not (p / "config.json").exists():
        from cachekd.rundir import cohort_peer_dirs

        peers = cohort_peer_dirs(p)
        if peers:  # a cohort directory is a run directory too, but its models are its peers'
            raise CachekdError(f"{str(p)!r} is a cohort directory, which has no model of its own; give one of its "
                               f"peers' runs: {', '.join(repr(str(d)) for d in peers)}.")
        run = RunDir(p.parent if p.name == MODEL_DIR else p)
        if run.is_run:
            raise CachekdError(run.unfinished_message())
    if not p.exists():
        raise CachekdError(f"model {str(p)!r} does not exist; give an HF checkpoint directory or a run directory.")
    if not (p / "config.json").exists():
        raise CachekdError(f"{str(p)!r} is not an HF checkpoint (no config.json) nor a run directory with model/.")
    return p


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advisory warnings (our own bars say what runs)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(path: str | Path, dtype: torch.dtype | None = None):
    """Load any `AutoModelForCausalLM` checkpoint from a local directory (never from a hub)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    d = resolve_model_dir(path)
    weights = list(d.glob("*.safetensors")) + list(d.glob("*.bin")) + list(d.glob("*.safetensors.index.json"))
    if not weights:
        raise CachekdError(f"checkpoint {str(d)!r} has a config but no weights (*.safetensors or *.bin).")
    try:
        return AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for broken checkpoints
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CachekdError(f"cannot load the checkpoint {str(d)!r} ({msg}); is it complete and uncorrupted?") from None


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over the checkpoint's config and weight files (names and bytes)."""
    d = resolve_model_dir(path)
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".json") and not f.name.startswith("tokenizer")
                            and f.name not in ("special_tokens_map.json", "generation_config.json")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
    return h.hexdigest()


def max_positions(model) -> int | None:
    """The longest input a model takes: its config's ``max_position_embeddings`` (GPT-2: ``n_positions``), or None
    when the config does not say."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def check_positions(model, seq_len: int, who: str) -> None:
    """Refuse a model that takes fewer positions than the `seq_len`-token windows it would read. Past its
    positions GPT-2 fails with an IndexError (learned position embeddings) and a LLaMA runs silently on rotary
    positions it never saw in training. `who` starts the sentence ("teacher 'x'", "the model ...")."""
    max_pos = max_positions(model)
    if max_pos is not None and seq_len > max_pos:
        raise CachekdError(
            f"{who} takes at most {max_pos} positions but the token store's windows are {seq_len} tokens; use a model "
            f"with at least {seq_len} positions, or a token store prepared with windows of {max_pos} tokens or less."
        )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output_size(model) -> int | None:
    """Number of logits the model emits a position: the rows of its LM head (`out_features`, else its weight's
    rows), else its `config.vocab_size`; None when neither is known."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is not None:
        weight = getattr(head, "weight", None)
        rows = getattr(head, "out_features", None) or (weight.shape[0] if weight is not None else None)
        if rows:
            return int(rows)
    return int(getattr(getattr(model, "config", None), "vocab_size", 0)) or None


def output_embedding(model) -> torch.nn.Module:
    """The LM head (V, H) of an HF causal LM."""
    head = model.get_output_embeddings()
    if head is None:
        raise CachekdError(f"{type(model).__name__} has no output embedding; it is not a causal LM.")
    return head


def backbone(model) -> torch.nn.Module:
    """The decoder stack whose `last_hidden_state` (after the final norm) feeds the LM head."""
    return model.base_model
