"""The teacher-logit cache: `format` owns the on-disk layout, `writer` fills it, `reader` streams it."""
