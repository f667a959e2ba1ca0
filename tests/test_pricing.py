"""PriceBook: genai-prices semantics, overrides, unknown models, cached lookups."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from typing import Any

import pytest
from genai_prices import Usage, calc_price, data_snapshot
from genai_prices.types import TieredPrices

from nbagent._errors import NbagentError
from nbagent._pricing import (
    DEFAULT_OUTPUT_LIMIT,
    PriceBook,
    PricingError,
    UnknownModelPriceWarning,
)


def genai_cost(model: str, inp: int, out: int, cached: int = 0, reasoning: int = 0) -> float:
    usage = Usage(
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=cached,
        output_reasoning_tokens=reasoning,
    )
    return float(calc_price(usage, model, provider_id="openai").total_price)


@pytest.mark.parametrize(
    ("model", "inp", "out", "cached", "reasoning"),
    [
        ("gpt-4o-mini", 1000, 500, 0, 0),
        ("gpt-4o-mini", 1000, 500, 400, 0),
        ("gpt-4o", 12_345, 678, 4096, 0),
        ("o3-mini", 2000, 3000, 1024, 2500),
        ("gpt-5", 50_000, 8000, 30_000, 6000),
        ("gpt-3.5-turbo", 100, 100, 50, 0),
    ],
)
def test_cost_matches_genai_prices(model: str, inp: int, out: int, cached: int, reasoning: int):
    usd, known = PriceBook().cost(model, inp, out, cached_tokens=cached, reasoning_tokens=reasoning)
    assert known is True
    assert usd == pytest.approx(genai_cost(model, inp, out, cached, reasoning), rel=1e-9)


def test_cached_tokens_are_part_of_input_and_cheaper():
    book = PriceBook()
    full, _ = book.cost("gpt-4o-mini", 10_000, 0)
    half_cached, _ = book.cost("gpt-4o-mini", 10_000, 0, cached_tokens=5000)
    rates = book.rates("gpt-4o-mini")
    assert rates is not None and rates.cached_input_per_mtok < rates.input_per_mtok
    assert half_cached < full
    expected = (5000 * rates.input_per_mtok + 5000 * rates.cached_input_per_mtok) / 1e6
    assert half_cached == pytest.approx(expected)


def test_reasoning_tokens_are_part_of_output_not_extra():
    book = PriceBook()
    plain, _ = book.cost("o3", 100, 1000)
    with_reasoning, _ = book.cost("o3", 100, 1000, reasoning_tokens=800)
    # o3 bills reasoning at the output rate: same total for the same output_tokens.
    assert with_reasoning == pytest.approx(plain)
    assert plain == pytest.approx(genai_cost("o3", 100, 1000))


def _tiered_openai_model() -> str:
    provider = next(p for p in data_snapshot.get_snapshot().providers if p.id == "openai")
    for model in provider.models:
        if isinstance(model.get_prices(datetime.now(tz=UTC)).input_mtok, TieredPrices):
            return model.id
    pytest.skip("genai-prices has no tiered OpenAI model")


def test_tiered_prices_pick_the_tier_from_the_input_size():
    model = _tiered_openai_model()
    book = PriceBook()
    for inp in (1000, 5_000_000):
        usd, known = book.cost(model, inp, 1000, cached_tokens=500)
        assert known
        assert usd == pytest.approx(genai_cost(model, inp, 1000, 500), rel=1e-9)
    rates = book.rates(model)
    assert rates is not None and rates.tiered


def test_date_suffixed_names_match_the_base_model():
    book = PriceBook()
    dated = book.cost("gpt-4o-mini-2024-07-18", 1000, 1000, cached_tokens=200)
    assert dated == book.cost("gpt-4o-mini", 1000, 1000, cached_tokens=200)
    assert dated[1] is True


def test_repeated_cost_is_served_from_the_cache(monkeypatch: pytest.MonkeyPatch):
    book = PriceBook()
    first = book.cost("gpt-4.1-mini", 1234, 567, cached_tokens=100)
    lookups: list[int] = []
    real = data_snapshot.get_snapshot

    def counting_get_snapshot() -> data_snapshot.DataSnapshot:
        lookups.append(1)
        return real()

    monkeypatch.setattr(data_snapshot, "get_snapshot", counting_get_snapshot)
    for _ in range(1000):
        assert book.cost("gpt-4.1-mini", 1234, 567, cached_tokens=100) == first
    assert lookups == []  # genai-prices was not consulted again
    assert first[0] == pytest.approx(genai_cost("gpt-4.1-mini", 1234, 567, 100), rel=1e-9)


def test_override_prices_a_local_model_at_zero():
    book = PriceBook(overrides={"my-local-model": {"input_per_mtok": 0, "output_per_mtok": 0}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known model must not warn
        assert book.cost("my-local-model", 10_000, 10_000, cached_tokens=10) == (0.0, True)
        assert book.worst_case("my-local-model", 10_000, 10_000) == 0.0
    assert book.is_known("my-local-model")


def test_override_wins_over_genai_prices_and_defaults_cached_and_reasoning():
    book = PriceBook(overrides={"gpt-4o-mini": {"input_per_mtok": 1, "output_per_mtok": 2}})
    usd, known = book.cost("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000, cached_tokens=500_000)
    assert known
    assert usd == pytest.approx(1.0 + 2.0)  # cached input at the input rate when not given
    book.set_price(
        "gpt-4o-mini",
        input_per_mtok=1,
        output_per_mtok=2,
        cached_input_per_mtok=0.5,
        reasoning_per_mtok=4,
    )
    usd, _ = book.cost("gpt-4o-mini", 1_000_000, 1_000_000, 500_000, 250_000)
    assert usd == pytest.approx(0.5 + 0.25 + 1.5 + 1.0)
    assert book.rates("gpt-4o-mini").source == "override"


def test_set_price_makes_an_unknown_model_known():
    book = PriceBook()
    with pytest.warns(UnknownModelPriceWarning):
        assert book.cost("acme-llm", 10, 10) == (0.0, False)
    book.set_price("acme-llm", input_per_mtok=1_000_000, output_per_mtok=0)
    assert book.cost("acme-llm", 3, 10) == (pytest.approx(3.0), True)


@pytest.mark.parametrize(
    "entry",
    [
        {"input_per_mtok": 1},
        {"input_per_mtok": 1, "output_per_mtok": -1},
        {"input_per_mtok": "cheap", "output_per_mtok": 1},
        {"input_per_mtok": 1, "output_per_mtok": 1, "input_cost": 3},
        {"input_per_mtok": 1, "output_per_mtok": 1, "max_output_tokens": 0},
    ],
)
def test_bad_override_is_rejected_with_a_clear_error(entry: dict[str, object]):
    with pytest.raises(PricingError) as info:
        PriceBook(overrides={"m": entry})
    assert isinstance(info.value, NbagentError)
    assert "'m'" in str(info.value)


def test_unknown_model_warns_once_and_costs_zero():
    book = PriceBook()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert book.cost("no-such-model-xyz", 1000, 1000) == (0.0, False)
        assert book.worst_case("no-such-model-xyz", 1000, 1000) == 0.0
    unknown = [w for w in caught if issubclass(w.category, UnknownModelPriceWarning)]
    assert len(unknown) == 1
    message = str(unknown[0].message)
    assert "no-such-model-xyz" in message
    assert "PriceBook(overrides=" in message and "set_price" in message
    assert not book.is_known("no-such-model-xyz")
    assert book.rates("no-such-model-xyz") is None


def test_unknown_provider_is_an_unknown_model():
    with pytest.warns(UnknownModelPriceWarning, match="my-gateway"):
        assert PriceBook().cost("gpt-4o", 10, 10, provider="my-gateway") == (0.0, False)


def test_worst_case_is_list_price_without_cache_discount():
    book = PriceBook()
    rates = book.rates("gpt-4o")
    assert rates is not None
    worst = book.worst_case("gpt-4o", 2000, 4096)
    expected = (2000 * rates.input_per_mtok + 4096 * rates.output_per_mtok) / 1e6
    assert worst == pytest.approx(expected)
    # It bounds every call within those limits, cached or not.
    assert worst >= book.cost("gpt-4o", 2000, 4096)[0]
    assert worst > book.cost("gpt-4o", 2000, 4096, cached_tokens=1500)[0]


@pytest.mark.parametrize(
    ("model", "limit"),
    [
        ("gpt-4o-mini", 16384),
        ("gpt-4o-mini-2024-07-18", 16384),
        ("gpt-4.1-nano", 32768),
        ("o3-mini", 100000),
        ("o1-mini", 65536),
        ("gpt-5-mini", 128000),
        ("gpt-3.5-turbo", 4096),
        ("totally-unknown", DEFAULT_OUTPUT_LIMIT),
    ],
)
def test_output_limit(model: str, limit: int):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asking for a limit never warns
        assert PriceBook().output_limit(model) == limit


def test_output_limit_override():
    book = PriceBook(
        overrides={"local": {"input_per_mtok": 0, "output_per_mtok": 0, "max_output_tokens": 2048}}
    )
    assert book.output_limit("local") == 2048


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_tokens": -1, "output_tokens": 1},
        {"input_tokens": 10, "output_tokens": 1, "cached_tokens": 11},
        {"input_tokens": 10, "output_tokens": 1, "reasoning_tokens": 2},
        {"input_tokens": 1.5, "output_tokens": 1},
    ],
)
def test_inconsistent_token_counts_are_rejected(kwargs: dict[str, Any]):
    with pytest.raises(PricingError):
        PriceBook().cost("gpt-4o-mini", **kwargs)
