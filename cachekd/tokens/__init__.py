"""The token store: fixed windows of token ids in a Zarr v3 group, a tokenizer beside it, a manifest written last.

`format` owns the layout (paths, dtypes, codecs, chunk sizing, manifest keys), `writer` builds a store
(`cachekd prepare`), `reader` reads a complete one (`TokenStore`)."""

from cachekd.tokens.format import (FORMAT, FORMAT_VERSION, POSITIONS_PER_CHUNK, SPLITS, blosc, chunk_windows_for,
                                   is_token_store, token_dtype)
from cachekd.tokens.reader import DamagedTokenChunkError, TokenStore
from cachekd.tokens.writer import PrepareConfig, prepare

__all__ = ["FORMAT", "FORMAT_VERSION", "POSITIONS_PER_CHUNK", "SPLITS", "DamagedTokenChunkError", "PrepareConfig",
           "TokenStore", "blosc", "chunk_windows_for", "is_token_store", "prepare", "token_dtype"]
