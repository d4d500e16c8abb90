"""When a schedule's ticks fall: cron in a time zone (DST included), every N seconds, and
what a bad expression or zone is told. No services: `common.schedules.Timing` is pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from common.schedules import ScheduleRequest, Timing, check_cron, check_zone, tick_key


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def ticks(timing: Timing, start: datetime, n: int) -> list[datetime]:
    """The next `n` ticks after `start`, each found from the one before (as the sweeper
    does: it stores a tick in UTC and asks for the next one after it)."""
    out = []
    for _ in range(n):
        start = timing.next_after(start)
        out.append(start)
    return out


def test_a_cron_tick_is_in_the_schedules_time_zone():
    berlin = Timing(cron="0 9 * * *", timezone="Europe/Berlin")
    assert berlin.next_after(utc(2026, 1, 15, 12)) == utc(2026, 1, 16, 8)  # CET: UTC+1
    assert berlin.next_after(utc(2026, 7, 15, 12)) == utc(2026, 7, 16, 7)  # CEST: UTC+2
    assert Timing(cron="0 9 * * *").next_after(utc(2026, 1, 15, 12)) == utc(2026, 1, 16, 9)


def test_the_next_tick_is_strictly_after_the_moment_given():
    timing = Timing(cron="30 2 * * *", timezone="UTC")
    assert timing.next_after(utc(2026, 1, 1, 2, 30)) == utc(2026, 1, 2, 2, 30)
    assert timing.next_after(utc(2026, 1, 1, 2, 29, 59)) == utc(2026, 1, 1, 2, 30)


def test_spring_forward_a_time_of_day_in_the_skipped_hour_fires_right_after_the_gap():
    # Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    daily = Timing(cron="30 2 * * *", timezone="Europe/Berlin")
    assert ticks(daily, utc(2026, 3, 28, 12), 2) == [
        utc(2026, 3, 29, 1, 0),    # 03:00 CEST, the first instant after the gap
        utc(2026, 3, 30, 0, 30),   # 02:30 CEST the next day
    ]


def test_spring_forward_a_wildcard_hour_has_no_ticks_in_the_missing_hour():
    half_hourly = Timing(cron="*/30 * * * *", timezone="Europe/Berlin")
    assert ticks(half_hourly, utc(2026, 3, 29, 0, 10), 3) == [
        utc(2026, 3, 29, 0, 30),   # 01:30 CET
        utc(2026, 3, 29, 1, 0),    # 03:00 CEST: one hour of wall clock, 30 minutes of time
        utc(2026, 3, 29, 1, 30),   # 03:30 CEST
    ]


def test_fall_back_a_time_of_day_in_the_repeated_hour_fires_once():
    # America/New_York, 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
    daily = Timing(cron="30 1 * * *", timezone="America/New_York")
    assert ticks(daily, utc(2026, 10, 31, 12), 2) == [
        utc(2026, 11, 1, 5, 30),   # 01:30 EDT, the first of the two
        utc(2026, 11, 2, 6, 30),   # 01:30 EST the next day; none at 01:30 EST on the 1st
    ]


def test_fall_back_a_wildcard_hour_fires_in_both_occurrences_of_the_hour():
    hourly = Timing(cron="0 * * * *", timezone="America/New_York")
    assert ticks(hourly, utc(2026, 11, 1, 4, 30), 3) == [
        utc(2026, 11, 1, 5),   # 01:00 EDT
        utc(2026, 11, 1, 6),   # 01:00 EST
        utc(2026, 11, 1, 7),   # 02:00 EST
    ]


def test_every_n_seconds_ticks_on_a_grid_from_the_anchor_whatever_the_clock_does():
    anchor = utc(2026, 3, 29, 0, 59, 58)
    timing = Timing(every_seconds=2, anchor=anchor)
    assert ticks(timing, anchor, 3) == [anchor + timedelta(seconds=s) for s in (2, 4, 6)]
    # late by 7.5 s: the missed ticks are not made up, the next is the first after now
    assert timing.next_after(anchor + timedelta(seconds=7.5)) == anchor + timedelta(seconds=8)
    daily = Timing(every_seconds=86400, anchor=utc(2026, 3, 28, 12))
    assert daily.next_after(utc(2026, 3, 29, 0)) == utc(2026, 3, 29, 12)  # 24 h, not 23


def test_a_cron_expression_with_no_tick_left_has_no_next_run_and_is_refused():
    # the 1st or 21st of a month that is also its last Monday: never
    never = "* * */20 * 1L"
    assert Timing(cron=never, timezone="UTC").next_after(utc(2026, 1, 1)) is None
    with pytest.raises(ValueError, match="matches no time within the next 50 years"):
        check_cron(never)


@pytest.mark.parametrize(("expression", "says"), [
    ("61 * * * *", "Bad minute"),
    ("* * * *", "five fields"),
    ("* * * * * *", "five fields"),  # cronsim's seconds field is not offered
    ("@daily", "five fields"),
    ("0 0 31 2 *", "never fires: no month it names has day 31"),
    ("0 0 30 2 *", "never fires: no month it names has day 30"),
    ("0 0 31 4,6 *", "never fires: no month it names has day 31"),
    ("0 0 32 2 *", "Bad day-of-month"),  # bad in every month: the field itself is wrong
    ("0 0 1 13 *", "not a valid cron expression"),  # a bad month is not a day problem
    ("0 0 1 foo *", "not a valid cron expression"),
    ("0 0 31 0 *", "not a valid cron expression"),
    ("*/0 * * * *", "not a valid cron expression"),
    ("a b c d e", "not a valid cron expression"),
])
def test_a_bad_cron_expression_is_refused_saying_what_is_wrong(expression, says):
    with pytest.raises(ValueError, match=says):
        check_cron(expression)


def test_a_cron_expression_is_normalised_to_single_spaces():
    assert check_cron("  0   9 * *\tMON-FRI ") == "0 9 * * MON-FRI"


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "../etc/passwd", "europe/berlin"])
def test_an_unknown_time_zone_is_refused(name):
    with pytest.raises(ValueError, match="not an IANA time zone name"):
        check_zone(name)


def test_iana_names_are_known_from_the_tzdata_package():
    for name in ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"):
        assert check_zone(name) == name


@pytest.mark.parametrize(("body", "loc"), [
    ({"name": "x", "job_type": "ECHO"}, []),
    ({"name": "x", "job_type": "ECHO", "cron": "* * * * *", "every_seconds": 5}, []),
    ({"name": "x", "job_type": "ECHO", "every_seconds": 5, "timezone": "UTC"}, []),
    ({"name": "x", "job_type": "ECHO", "every_seconds": 0}, ["every_seconds"]),
    ({"name": "-x", "job_type": "ECHO", "every_seconds": 5}, ["name"]),
    ({"name": "a/b", "job_type": "ECHO", "every_seconds": 5}, ["name"]),
    ({"name": "x", "job_type": "ECHO", "cron": "* * * * *", "timezone": "Mars/Base"},
     ["timezone"]),
])
def test_a_request_needs_one_timing_and_a_usable_name(body, loc):
    with pytest.raises(ValidationError) as caught:
        ScheduleRequest.model_validate(body)
    assert list(caught.value.errors()[0]["loc"]) == loc


def test_a_ticks_key_names_the_schedules_id_and_the_tick_in_utc():
    tick = datetime.fromisoformat("2026-03-29T03:00:00+02:00")
    assert tick_key("4f7c", tick) == "schedule\t4f7c\t2026-03-29T01:00:00+00:00"
