"""Cohorts: N students trained in one loop from one stream of token windows and cached teacher targets.

* `config`  the cohort YAML as typed dataclasses (peers, mutual-learning settings, search settings) and its checks.
* `wml`     weighted mutual learning's loss terms: per-peer cross-entropy and the pairwise peer divergences.
* `weights` the peer weights ω: the first-order mirror-descent update on the dev losses.
* `search`  the peer (student model) search: shape space, sampling, successive halving.

With mutual learning off a cohort is a *variant grid*: N independent students sharing one read and decode of the
token store and the cache.
"""
