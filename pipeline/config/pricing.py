"""The `[pricing]` table: prices per million tokens, by default and per model, so `cost` matches
the invoice (cached input at its own price where the provider bills it so)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import JobError
from .fields import Table, between, read_table, setting, zero_or_more

__all__ = ["PricingConfig", "ModelPrice", "Price"]


@dataclass(frozen=True)
class ModelPrice(Table):
    TABLE = "pricing.models"
    input_per_million: float = setting(doc="price of a million input tokens", check=zero_or_more)
    output_per_million: float = setting(doc="price of a million output tokens (reasoning included)", check=zero_or_more)
    cached_input_per_million: float | None = setting(None, doc="price of a million input tokens the provider read from "
                                                           "its prompt cache; none: this model's input price",
                                                     check=zero_or_more)


class Price(NamedTuple):
    """One model's prices per million tokens. `cached_input` None: cached tokens cost `input`."""

    input: float
    output: float
    cached_input: float | None = None


def _models(value: Any, where: str, base: Path) -> dict[str, Price]:
    if not isinstance(value, dict):
        raise JobError(f"{where} must be a table of models, not {type(value).__name__}")
    source = where.split(": [", 1)[0]
    prices = {}
    for model, table in value.items():
        p = read_table(ModelPrice, table, source=source, base=base, table=f"pricing.models.{json.dumps(model)}")
        prices[model] = Price(p.input_per_million, p.output_per_million, p.cached_input_per_million)
    return prices


@dataclass(frozen=True)
class PricingConfig(Table):
    """Prices per million tokens; reasoning tokens are output tokens (they are in completion_tokens)."""

    TABLE = "pricing"
    input_per_million: float | None = setting(None, doc="the default input price, for a model not in `models`", check=zero_or_more)
    output_per_million: float | None = setting(None, doc="the default output price", check=zero_or_more)
    cached_input_per_million: float | None = setting(
        None, check=zero_or_more, doc="the default price of input tokens read from the provider's prompt cache "
                                      "(usage cached_tokens); none: billed at input_per_million")
    models: dict[str, Price] = setting(default_factory=dict, parse=_models,
                                       doc='per model: [pricing.models."name"] input_per_million, output_per_million, '
                                           'cached_input_per_million')
    budget: float | None = setting(None, doc="stop sending before the job's spend could pass this (needs max_tokens)",
                                   check=zero_or_more)
    batch_discount: float = setting(0.5, doc='mode "batch": batch answers cost this fraction of the prices above',
                                    check=between(0, 1))

    def validate(self) -> None:
        if (self.input_per_million is None) != (self.output_per_million is None):
            raise JobError("[pricing] input_per_million: give both input_per_million and output_per_million, or neither")
        if self.cached_input_per_million is not None and self.input_per_million is None:
            raise JobError("[pricing] cached_input_per_million is the default models' cached price: give "
                           "input_per_million and output_per_million with it, or set it per model under [pricing.models]")

    def price(self, model: str | None, asked: str) -> Price | None:
        """The prices for the model that answered, else the one asked for, else the defaults. A
        model's own prices stand alone: the default cached price is not applied to them."""
        for name in (model, asked):
            if name is not None and name in self.models:
                return Price(*self.models[name])  # a job built in code may give (input, output) pairs
        if self.input_per_million is None or self.output_per_million is None:
            return None
        return Price(self.input_per_million, self.output_per_million, self.cached_input_per_million)
