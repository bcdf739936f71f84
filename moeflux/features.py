"""Model features layered on the core `Model`: generation, tokenizer, chat template,
state snapshots and sequence control. `moeflux.model.Model` inherits from
`ModelFeatures`, so these read as ordinary methods of Model."""
from __future__ import annotations


class ModelFeatures:
    """Mixin of the higher-level Model methods (filled in by the generation work)."""

    __slots__ = ()
