"""Parsing `redis+sentinel://` URLs: every part, and a clear error for each bad form."""

from __future__ import annotations

import pytest

from infra.redis_client import InvalidRedisUrl, SentinelUrl, is_sentinel_url, parse_sentinel_url

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://s1:26379,s2:26380/fedq/2",
            SentinelUrl(sentinels=(("s1", 26379), ("s2", 26380)), master="fedq", db=2),
        ),
        (
            "redis+sentinel://s1/fedq",
            SentinelUrl(sentinels=(("s1", 26379),), master="fedq", db=0),
        ),
        (
            "redis+sentinel://app:p%40ss@s1:1/fedq/0?sentinel_password=sp",
            SentinelUrl(
                sentinels=(("s1", 1),),
                master="fedq",
                username="app",
                password="p@ss",
                sentinel_password="sp",
            ),
        ),
        (
            "redis+sentinel://:secret@s1/fedq/",
            SentinelUrl(sentinels=(("s1", 26379),), master="fedq", password="secret"),
        ),
    ],
)
def test_a_sentinel_url_is_split_into_its_parts(url: str, expected: SentinelUrl) -> None:
    assert is_sentinel_url(url)
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://s1:26379", "needs /master-name"),
        ("redis+sentinel://s1/fedq/zero", "must be a number"),
        ("redis+sentinel://s1/fedq/0/extra", "needs /master-name"),
        ("redis+sentinel://s1:port/fedq", "bad Sentinel host"),
        ("redis+sentinel://s1,/fedq", "bad Sentinel host"),
        ("redis+sentinel://s1/fedq?ssl=1", "unknown Sentinel URL options"),
        ("redis://s1/0", "not a Sentinel URL"),
    ],
)
def test_a_bad_sentinel_url_is_a_clear_error(url: str, says: str) -> None:
    with pytest.raises(InvalidRedisUrl, match=says):
        parse_sentinel_url(url)


def test_plain_urls_are_not_sentinel_urls() -> None:
    assert not is_sentinel_url("redis://127.0.0.1:6379/0")
    assert not is_sentinel_url("rediss://host/0")
