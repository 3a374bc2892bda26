import pytest

from desired_state.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0),
        (90, 90),
        ("0", 0),
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
    ],
)
def test_parse_duration_accepts(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5x", "-1", "1.5h", "", " ", "1.5", "h", "30m1h", "1 h", "2hh"])
def test_parse_duration_rejects_text(value):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == f"bad duration '{value}': use seconds or 90s / 30m / 2h"


@pytest.mark.parametrize("value", [-1, True, 1.5])
def test_parse_duration_rejects_other_values(value):
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (40, "40s"),
        (125, "2m5s"),
        (3600, "1h"),
        (5400, "1h30m"),
        (90061, "1d1h1m1s"),
        (0.4, "0.4s"),
        (59.6, "1m"),
        (-90, "-1m30s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_then_parse_round_trips():
    for seconds in (1, 59, 61, 3599, 3601, 86399, 90061):
        assert parse_duration(format_duration(seconds)) == seconds
