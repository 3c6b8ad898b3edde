"""The base of every recipe block (imports only pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Block(BaseModel):
    """Base of every recipe block: unknown keys are errors, assignments are validated.

    Numbers given for text keys are taken as text (``--set model.revision=20240101``,
    ``output_dir: 2024``): YAML types them as numbers, the schema says they are names.
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        protected_namespaces=(),
        coerce_numbers_to_str=True,
        allow_inf_nan=False,  # lr: .inf passes `gt=0`; no recipe number is meant to be infinite or NaN
    )
