"""The `model` section of config.yml: the main model and how it is loaded.

Its load keys (max_seq_len, cache_mode, gpu_split, reasoning, …) are declared once, in
`settings.load_table`, and added here with `create_model`; this module declares the keys that
are about the server rather than a load (where models live, inline loading, dummy names, the
startup model, `use_as_default`, `unload_grace_s`) and helpers that turn nulls into the values
kodkod actually uses. kodkod extensions: `n_threads`, `flash_attention`, `batch_invariant`,
`kv_layout` (in the table) and `unload_grace_s`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import Field, create_model

from kodkod.settings.load_param import Section
from kodkod.settings.load_table import config_fields
from kodkod.settings.sections import SectionModel

DEFAULT_MAX_BATCH_SIZE = 32
"""kodkod's batch limit when `model.max_batch_size` is null."""


class _ModelServerKeys(SectionModel):
    """The `model` keys that are not load parameters."""

    model_dir: str = Field("models", description="Folder holding the models (one file or folder per model).")
    inline_model_loading: bool = Field(
        False,
        description="Let admin requests switch models by naming another model in the "
        "request's `model` field.",
    )
    use_dummy_models: bool = Field(
        False, description="List the names in dummy_model_names in /v1/models too."
    )
    dummy_model_names: list[str] = Field(
        default_factory=lambda: ["gpt-3.5-turbo"],
        description="Fake model names that clients may send; they select the loaded model.",
    )
    model_name: str | None = Field(
        None, description="Model (name inside model_dir) to load at startup; null loads none."
    )
    use_as_default: list[str] = Field(
        default_factory=list,
        description="Names of keys in this section and in draft_model whose values also apply "
        "to models loaded through the API, e.g. [max_seq_len, cache_mode].",
    )
    unload_grace_s: float = Field(
        10.0,
        ge=0,
        description="kodkod extension: when a model is unloaded or replaced and its generations "
        "have ended, how long to wait for requests that still use it (tokenizing, sending their "
        "last chunks) before the swap goes on anyway; the old model is then freed when the last "
        "of them ends.",
    )

    if TYPE_CHECKING:  # the load keys are added from the table at runtime

        def __getattr__(self, name: str) -> Any: ...


if TYPE_CHECKING:
    _ModelFields = _ModelServerKeys
else:
    _ModelFields = create_model(
        "_ModelFields", __base__=_ModelServerKeys, __module__=__name__, **config_fields(Section.MODEL)
    )


class ModelSettings(_ModelFields):
    """Section `model`: the main model and how it is loaded."""

    def effective_n_threads(self) -> int:
        """`n_threads`, or the number of CPUs this process may run on."""
        if self.n_threads is not None:
            return int(self.n_threads)
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1

    def effective_max_batch_size(self) -> int:
        """`max_batch_size`, or kodkod's default."""
        return int(self.max_batch_size) if self.max_batch_size is not None else DEFAULT_MAX_BATCH_SIZE
