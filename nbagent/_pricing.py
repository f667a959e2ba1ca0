"""What an LLM call costs, from the bundled genai-prices data plus user overrides.

:class:`PriceBook` answers three questions for the cost cap and the trace:

* :meth:`PriceBook.cost` -- the USD cost of a finished call from its token usage.
  Token semantics follow genai-prices (and OpenAI's usage objects): ``cached_tokens`` are
  *part of* ``input_tokens`` and billed at the cache-read rate; ``reasoning_tokens`` are
  *part of* ``output_tokens`` and billed at the reasoning rate (the output rate unless the
  model has its own reasoning price).
* :meth:`PriceBook.worst_case` -- the most a call could cost before it is sent: every
  input token at the list input rate (no cache discount) and ``max_output_tokens`` at the
  output rate. The cost cap reserves this up front.
* :meth:`PriceBook.output_limit` -- the model's maximum output tokens, used when a request
  sets no ``max_tokens``. genai-prices 0.2 records only the context window, so this comes
  from a small table of OpenAI limits (:data:`OUTPUT_LIMITS`, longest prefix wins), then
  ``min(16384, context_window)``, then 16384.

Speed: genai-prices' ``calc_price`` takes ~130 µs per call (its first call loads the data,
~0.5 s). The book resolves a model's rates once per (provider, model) and UTC day and then
prices a call with a few float multiplications. Models with tiered ("cliff") prices keep
every tier and pick one from the input size, as genai-prices does.

Unknown models cost $0.0 with ``known=False``; the book warns once per model
(:class:`UnknownModelPriceWarning`) with the fix: ``PriceBook(overrides={...})`` or
:meth:`PriceBook.set_price`. Overrides also price local models (``0`` everywhere)::

    PriceBook(overrides={"my-local-model": {"input_per_mtok": 0, "output_per_mtok": 0}})

Model names with date suffixes (``gpt-4o-mini-2024-07-18``) match their base model.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from genai_prices import data_snapshot
from genai_prices.types import ModelPrice, TieredPrices

from ._errors import NbagentError

__all__ = [
    "DEFAULT_OUTPUT_LIMIT",
    "OUTPUT_LIMITS",
    "ModelRates",
    "PriceBook",
    "PricingError",
    "UnknownModelPriceWarning",
]

#: Output limit of a model nothing else is known about.
DEFAULT_OUTPUT_LIMIT = 16384

#: Maximum output tokens of OpenAI models (from OpenAI's model pages); longest prefix wins.
OUTPUT_LIMITS: Mapping[str, int] = {
    "gpt-3.5-turbo": 4096,
    "gpt-4": 8192,
    "gpt-4-turbo": 4096,
    "gpt-4-32k": 8192,
    "gpt-4o": 16384,
    "gpt-4o-mini": 16384,
    "chatgpt-4o": 16384,
    "gpt-4.1": 32768,
    "gpt-4.5": 16384,
    "o1": 100000,
    "o1-mini": 65536,
    "o1-preview": 32768,
    "o3": 100000,
    "o3-mini": 100000,
    "o4-mini": 100000,
    "gpt-5": 128000,
    "gpt-5-chat": 16384,
    "gpt-oss": 131072,
}

#: Keys an override entry may have (USD per million tokens, and the output limit).
_OVERRIDE_KEYS = frozenset(
    {
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "reasoning_per_mtok",
        "max_output_tokens",
    }
)
_DATE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")
_MTOK = 1_000_000


class PricingError(NbagentError, ValueError):
    """A price override or a token count passed to the price book is invalid."""


class UnknownModelPriceWarning(UserWarning):
    """A model has no known price: its calls are counted as $0 and flagged in the trace."""


@dataclass(frozen=True)
class ModelRates:
    """USD per million tokens of one model (the base tier for tiered prices)."""

    #: Uncached input tokens.
    input_per_mtok: float
    #: Input tokens served from the prompt cache.
    cached_input_per_mtok: float
    #: Output tokens.
    output_per_mtok: float
    #: Reasoning tokens (part of the output).
    reasoning_per_mtok: float
    #: Where the price comes from: ``"genai-prices"`` or ``"override"``.
    source: str
    #: Whether prices step up with the prompt size (genai-prices "tiers").
    tiered: bool = False


@dataclass(frozen=True)
class _Tier:
    """Per-token rates valid while the input is above ``start`` tokens."""

    start: int
    input: float
    cached: float
    output: float
    reasoning: float


@dataclass(frozen=True)
class _Card:
    """Everything needed to price a (provider, model) in microseconds."""

    tiers: tuple[_Tier, ...]  # ascending start; tiers[0].start == -1
    fixed: float  # USD per request (genai-prices ``requests_kcount``)
    source: str
    day: int  # UTC day the genai-prices rates were resolved for (-1: never stale)
    context_window: int | None
    max_output_tokens: int | None

    def tier(self, input_tokens: int) -> _Tier:
        chosen = self.tiers[0]
        for tier in self.tiers[1:]:
            if input_tokens > tier.start:
                chosen = tier
        return chosen


def _base_name(model: str) -> str:
    """Lower-case model name without a date suffix (``gpt-4o-2024-08-06`` -> ``gpt-4o``)."""
    return _DATE_SUFFIX.sub("", model.strip().lower())


def _today() -> int:
    return int(time.time() // 86400)


def _price_at(price: Decimal | TieredPrices | None, input_tokens: int) -> Decimal | None:
    """genai-prices' tier rule: the highest tier whose start the input exceeds."""
    if price is None or isinstance(price, Decimal):
        return price
    chosen = price.base
    for tier in price.tiers:
        if input_tokens > tier.start:
            chosen = tier.price
    return chosen


def _card_from_genai(model_price: ModelPrice, day: int, context_window: int | None) -> _Card:
    prices = {k: v for k, v in model_price.__dict__.items() if v is not None}
    token_keys = ("input_mtok", "cache_read_mtok", "output_mtok", "output_reasoning_mtok")
    starts = sorted(
        {
            tier.start
            for key in token_keys
            if isinstance(prices.get(key), TieredPrices)
            for tier in prices[key].tiers
        }
    )
    tiers: list[_Tier] = []
    for start in [-1, *starts]:
        probe = start + 1  # an input size inside this tier
        inp = _price_at(prices.get("input_mtok"), probe) or Decimal(0)
        out = _price_at(prices.get("output_mtok"), probe) or Decimal(0)
        cached = _price_at(prices.get("cache_read_mtok"), probe)
        reasoning = _price_at(prices.get("output_reasoning_mtok"), probe)
        tiers.append(
            _Tier(
                start=start,
                input=float(inp) / _MTOK,
                cached=float(inp if cached is None else cached) / _MTOK,
                output=float(out) / _MTOK,
                reasoning=float(out if reasoning is None else reasoning) / _MTOK,
            )
        )
    fixed = prices.get("requests_kcount")
    return _Card(
        tiers=tuple(tiers),
        fixed=float(fixed) / 1000 if isinstance(fixed, Decimal) else 0.0,
        source="genai-prices",
        day=day,
        context_window=context_window,
        max_output_tokens=None,
    )


def _card_from_override(model: str, entry: Mapping[str, Any]) -> _Card:
    if not isinstance(entry, Mapping):
        raise PricingError(
            f"The price override of {model!r} must be a dict like "
            "{'input_per_mtok': 0.15, 'output_per_mtok': 0.6}."
        )
    unknown = set(entry) - _OVERRIDE_KEYS
    if unknown:
        raise PricingError(
            f"Unknown keys {sorted(unknown)} in the price override of {model!r}; "
            f"use {sorted(_OVERRIDE_KEYS)}."
        )
    missing = {"input_per_mtok", "output_per_mtok"} - set(entry)
    if missing:
        raise PricingError(f"The price override of {model!r} needs {sorted(missing)}.")
    values: dict[str, float] = {}
    for key in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "reasoning_per_mtok"):
        if key not in entry:
            continue
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)) or value < 0:
            raise PricingError(
                f"{key} of {model!r} must be a number >= 0 (USD per million tokens), got {value!r}."
            )
        values[key] = float(value)
    limit = entry.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise PricingError(f"max_output_tokens of {model!r} must be an int >= 1, got {limit!r}.")
    inp, out = values["input_per_mtok"], values["output_per_mtok"]
    tier = _Tier(
        start=-1,
        input=inp / _MTOK,
        cached=values.get("cached_input_per_mtok", inp) / _MTOK,
        output=out / _MTOK,
        reasoning=values.get("reasoning_per_mtok", out) / _MTOK,
    )
    return _Card(
        tiers=(tier,),
        fixed=0.0,
        source="override",
        day=-1,
        context_window=None,
        max_output_tokens=limit,
    )


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PricingError(f"{name} must be an int >= 0, got {value!r}.")


class PriceBook:
    """Model prices (genai-prices + overrides), cached for microsecond lookups.

    :param overrides: ``{model: {"input_per_mtok": ..., "output_per_mtok": ...,
        "cached_input_per_mtok": ..., "reasoning_per_mtok": ..., "max_output_tokens": ...}}``
        in USD per million tokens. The first two are required; cached input defaults to
        the input rate and reasoning to the output rate. An override wins over
        genai-prices for any provider, and matches the model with or without a date
        suffix.
    """

    def __init__(self, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._overrides: dict[str, _Card] = {}
        self._cards: dict[tuple[str, str], _Card | None] = {}
        self._warned: set[tuple[str, str]] = set()
        for model, entry in (overrides or {}).items():
            self._overrides[_base_name(model)] = _card_from_override(model, entry)

    # ----------------------------------------------------------------- public verbs

    def set_price(
        self,
        model: str,
        *,
        input_per_mtok: float,
        output_per_mtok: float,
        cached_input_per_mtok: float | None = None,
        reasoning_per_mtok: float | None = None,
        max_output_tokens: int | None = None,
    ) -> None:
        """Add or replace the price of ``model`` (USD per million tokens)."""
        entry: dict[str, Any] = {
            "input_per_mtok": input_per_mtok,
            "output_per_mtok": output_per_mtok,
        }
        optional = {
            "cached_input_per_mtok": cached_input_per_mtok,
            "reasoning_per_mtok": reasoning_per_mtok,
            "max_output_tokens": max_output_tokens,
        }
        entry.update({k: v for k, v in optional.items() if v is not None})
        self._overrides[_base_name(model)] = _card_from_override(model, entry)
        self._cards.clear()  # a cached card (or a cached "unknown") must not win

    def cost(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        provider: str = "openai",
    ) -> tuple[float, bool]:
        """``(usd, known)`` of a call. Cached tokens are part of the input, reasoning of the output.

        An unknown model returns ``(0.0, False)`` and warns once.
        """
        _check_counts(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached_tokens,
            reasoning_tokens=reasoning_tokens,
        )
        if cached_tokens > input_tokens:
            raise PricingError(
                f"cached_tokens ({cached_tokens}) are part of input_tokens ({input_tokens}) "
                "and cannot exceed them."
            )
        if reasoning_tokens > output_tokens:
            raise PricingError(
                f"reasoning_tokens ({reasoning_tokens}) are part of output_tokens "
                f"({output_tokens}) and cannot exceed them."
            )
        card = self._card(model, provider)
        if card is None:
            return 0.0, False
        t = card.tier(input_tokens)
        usd = (
            (input_tokens - cached_tokens) * t.input
            + cached_tokens * t.cached
            + (output_tokens - reasoning_tokens) * t.output
            + reasoning_tokens * t.reasoning
            + card.fixed
        )
        return usd, True

    def worst_case(
        self, model: str, input_tokens: int, max_output_tokens: int, provider: str = "openai"
    ) -> float:
        """The most a call could cost: list input price (no cache discount) + all output.

        Output is priced at the higher of the output and reasoning rates. An unknown
        model returns 0.0 (and warns once); check :meth:`is_known` to refuse it instead.
        """
        _check_counts(input_tokens=input_tokens, max_output_tokens=max_output_tokens)
        card = self._card(model, provider)
        if card is None:
            return 0.0
        t = card.tier(input_tokens)
        return input_tokens * t.input + max_output_tokens * max(t.output, t.reasoning) + card.fixed

    def output_limit(self, model: str, provider: str = "openai") -> int:
        """The model's maximum output tokens (override, :data:`OUTPUT_LIMITS`, then a default)."""
        base = _base_name(model)
        override = self._overrides.get(base)
        if override is not None and override.max_output_tokens is not None:
            return override.max_output_tokens
        matches = [prefix for prefix in OUTPUT_LIMITS if base.startswith(prefix)]
        if matches:
            return OUTPUT_LIMITS[max(matches, key=len)]
        card = self._card(model, provider, warn=False)
        if card is not None and card.context_window:
            return min(DEFAULT_OUTPUT_LIMIT, card.context_window)
        return DEFAULT_OUTPUT_LIMIT

    def is_known(self, model: str, provider: str = "openai") -> bool:
        """Whether the book has a price for ``model`` (does not warn)."""
        return self._card(model, provider, warn=False) is not None

    def rates(self, model: str, provider: str = "openai") -> ModelRates | None:
        """The model's rates in USD per million tokens, or None if unknown (does not warn)."""
        card = self._card(model, provider, warn=False)
        if card is None:
            return None
        t = card.tiers[0]
        return ModelRates(
            input_per_mtok=t.input * _MTOK,
            cached_input_per_mtok=t.cached * _MTOK,
            output_per_mtok=t.output * _MTOK,
            reasoning_per_mtok=t.reasoning * _MTOK,
            source=card.source,
            tiered=len(card.tiers) > 1,
        )

    # ----------------------------------------------------------------- plumbing

    def _card(self, model: str, provider: str, *, warn: bool = True) -> _Card | None:
        key = (provider, model)
        if key in self._cards:
            card = self._cards[key]
            if card is not None and card.day not in (-1, _today()):
                # genai-prices rates can change by date: re-resolve once a day.
                card = self._cards[key] = self._resolve(model, provider)
        else:
            card = self._cards[key] = self._resolve(model, provider)
        if card is None and warn and key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"nbagent has no price for model {model!r} (provider {provider!r}): its calls "
                "count as $0.00 and are flagged as unpriced in the trace, and the cost cap "
                "cannot limit them. Add the price with PriceBook(overrides={"
                f"{model!r}: {{'input_per_mtok': ..., 'output_per_mtok': ..., "
                "'cached_input_per_mtok': ...}}) or price_book.set_price("
                f"{model!r}, input_per_mtok=..., output_per_mtok=...) (USD per million "
                "tokens; use 0 for a local model).",
                UnknownModelPriceWarning,
                stacklevel=3,
            )
        return card

    def _resolve(self, model: str, provider: str) -> _Card | None:
        override = self._overrides.get(_base_name(model))
        if override is not None:
            return override
        snapshot = data_snapshot.get_snapshot()
        try:
            _, info = snapshot.find_provider_model(model, None, provider, None)
        except LookupError:
            return None
        model_price = info.get_prices(datetime.now(tz=UTC))
        return _card_from_genai(model_price, _today(), info.context_window)
