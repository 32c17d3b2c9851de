"""Device-speed profiles: parsing and the slowdowns they give."""

from __future__ import annotations

import pytest

from fedq.speeds import SpeedProfile, parse_speed_profile, slowdowns

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("uniform", SpeedProfile("uniform")),
        ("lognormal:0.5", SpeedProfile("lognormal", sigma=0.5)),
        ("stragglers:0.25:10", SpeedProfile("stragglers", fraction=0.25, slowdown=10.0)),
    ],
)
def test_profiles_parse_and_print_back(text: str, expected: SpeedProfile) -> None:
    profile = parse_speed_profile(text)
    assert profile == expected
    assert str(profile) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fast",
        "uniform:2",
        "lognormal",
        "lognormal:x",
        "lognormal:-1",
        "stragglers:0.5",
        "stragglers:2:10",
        "stragglers:0.5:0.5",
    ],
)
def test_malformed_profiles_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"speed profile|must be numbers"):
        parse_speed_profile(text)


def test_stragglers_slow_exactly_the_fraction() -> None:
    # Arrange / act: a quarter of 8 devices 10x slower
    factors = slowdowns(parse_speed_profile("stragglers:0.25:10"), 8, seed=1)
    # Assert
    assert sorted(factors) == [1.0] * 6 + [10.0] * 2


def test_lognormal_fastest_device_is_1_and_seed_repeats() -> None:
    profile = parse_speed_profile("lognormal:1")
    factors = slowdowns(profile, 16, seed=3)
    assert min(factors) == 1.0
    assert max(factors) > 1.5
    assert slowdowns(profile, 16, seed=3) == factors
    assert slowdowns(profile, 16, seed=4) != factors


def test_uniform_is_all_ones() -> None:
    assert slowdowns(parse_speed_profile("uniform"), 5, seed=0) == [1.0] * 5
