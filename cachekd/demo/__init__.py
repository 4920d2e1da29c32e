"""`cachekd demo`: the whole job on a built-in corpus, on CPU, in minutes.

`data` generates the corpus and the minimal pairs from a small grammar (a data table); `run` runs the stages."""

from cachekd.demo.run import run_demo

__all__ = ["run_demo"]
