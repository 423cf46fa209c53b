"""The prune retention policy: which backups each --keep-* rule keeps."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blksnap.backup.retention import (
    Backup,
    Decision,
    Policy,
    parse_backup_time,
    select,
    table,
)
from blksnap.errors import InvalidArgument

UTC = dt.UTC


def at(text: str) -> dt.datetime:
    """``"2026-12-31T12:00"`` -> aware UTC datetime."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def backup_id(t: dt.datetime, suffix: str = "") -> str:
    return t.strftime("%Y%m%dT%H%M%SZ") + suffix


def kept(decisions: list[Decision]) -> dict[str, tuple[str, ...]]:
    return {d.id: d.reasons for d in decisions if d.keep}


# ---------------------------------------------------------------------------
# ten backups placed by hand around the turn of 2026 (ISO year 2026 has 53 weeks)

# (seq, id, time, what it is)
SMALL = [
    (1, "20261220T100000Z", at("2026-12-20T10:00"), "Sun, 2026-W51"),
    (2, "20261221T090000Z", at("2026-12-21T09:00"), "Mon, 2026-W52"),
    (3, "20261227T230000Z", at("2026-12-27T23:00"), "Sun, 2026-W52"),
    (4, "20261228T003000Z", at("2026-12-28T00:30"), "Mon, 2026-W53"),
    (5, "20261231T120000Z", at("2026-12-31T12:00"), "Thu, 2026-W53, last of 2026"),
    (6, "20270101T080000Z", at("2027-01-01T08:00"), "Fri, 2026-W53, first of 2027"),
    (7, "20270103T220000Z", at("2027-01-03T22:00"), "Sun, 2026-W53"),
    (8, "20270104T010000Z", at("2027-01-04T01:00"), "Mon, 2027-W01"),
    (9, "20270104T010000Z-2", at("2027-01-04T01:00"), "same second as 8, newer by seq"),
    (10, "20270104T015959Z", at("2027-01-04T01:59:59"), "same hour as 8 and 9"),
]
SMALL_IDS = {seq: backup_id for seq, backup_id, _, _ in SMALL}


def small_backups(shuffle_seed: int | None = None) -> list[Backup]:
    backups = [Backup(i, t, seq) for seq, i, t, _ in SMALL]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(backups)
    return backups


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # keep-last: the tie at 01:00:00 is broken by seq: 9 is newer than 8.
        (Policy(last=2), {10: ["last 1"], 9: ["last 2"]}),
        (Policy(last=-1), {n: [f"last {11 - n}"] for n in range(1, 11)}),
        # 8, 9 and 10 share the hour 2027-01-04 01.
        (Policy(hourly=2), {10: ["hourly 1"], 7: ["hourly 2"]}),
        (Policy(daily=3), {10: ["daily 1"], 7: ["daily 2"], 6: ["daily 3"]}),
        # 2027-01-03 (Sun) and 2027-01-04 (Mon) are different weeks; 2026-12-31
        # and 2027-01-01 are the same week, 2026-W53, which starts Mon 2026-12-28.
        (Policy(weekly=3), {10: ["weekly 1"], 7: ["weekly 2"], 3: ["weekly 3"]}),
        (
            Policy(weekly=-1),
            {10: ["weekly 1"], 7: ["weekly 2"], 3: ["weekly 3"], 1: ["weekly 4"]},
        ),
        (Policy(monthly=2), {10: ["monthly 1"], 5: ["monthly 2"]}),
        # only two years exist: asking for more keeps both
        (Policy(yearly=3), {10: ["yearly 1"], 5: ["yearly 2"]}),
        (Policy(yearly=-1), {10: ["yearly 1"], 5: ["yearly 2"]}),
        (
            Policy(last=1, daily=2, weekly=2, monthly=2, yearly=-1),
            {
                10: ["last 1", "daily 1", "weekly 1", "monthly 1", "yearly 1"],
                7: ["daily 2", "weekly 2"],
                5: ["monthly 2", "yearly 2"],
            },
        ),
        # more than exist: everything is kept
        (Policy(last=50), {n: [f"last {11 - n}"] for n in range(1, 11)}),
    ],
    ids=lambda value: value.describe() if isinstance(value, Policy) else "",
)
def test_small_table(policy: Policy, expected: dict[int, list[str]]) -> None:
    want = {SMALL_IDS[seq]: tuple(reasons) for seq, reasons in expected.items()}
    for seed in (None, 1, 2, 3):
        decisions = select(small_backups(seed), policy)
        assert [d.seq for d in decisions] == list(range(10, 0, -1))  # newest first
        assert kept(decisions) == want
        for d in decisions:
            assert d.keep == bool(d.reasons)


def test_iso_week_boundaries() -> None:
    # The whole of 2026-W53 (Mon 2026-12-28 .. Sun 2027-01-03) is one week.
    backups = [
        Backup("a", at("2026-12-31T23:59:59"), 1),
        Backup("b", at("2027-01-01T00:00:00"), 2),
    ]
    assert kept(select(backups, Policy(weekly=5))) == {"b": ("weekly 1",)}
    assert kept(select(backups, Policy(daily=5))) == {"b": ("daily 1",), "a": ("daily 2",)}
    assert kept(select(backups, Policy(yearly=5))) == {"b": ("yearly 1",), "a": ("yearly 2",)}
    # A Sunday and the Monday after it are different weeks.
    backups = [
        Backup("sun", at("2027-01-03T23:59:59"), 1),
        Backup("mon", at("2027-01-04T00:00:00"), 2),
    ]
    assert kept(select(backups, Policy(weekly=5))) == {
        "mon": ("weekly 1",),
        "sun": ("weekly 2",),
    }
    # A Monday and the Sunday after it are the same week.
    backups = [
        Backup("mon", at("2027-01-04T00:00:00"), 1),
        Backup("sun", at("2027-01-10T23:59:59"), 2),
    ]
    assert kept(select(backups, Policy(weekly=5))) == {"sun": ("weekly 1",)}


# ---------------------------------------------------------------------------
# one backup every 6 hours for 60 days: 2026-10-01T00:00Z .. 2026-11-29T18:00Z

START = at("2026-10-01T00:00")
SERIES = [
    Backup(backup_id(START + dt.timedelta(hours=6 * n)), START + dt.timedelta(hours=6 * n), n)
    for n in range(60 * 4)
]


def test_series_shape() -> None:
    assert len(SERIES) == 240
    assert SERIES[-1].id == "20261129T180000Z"
    assert at("2026-11-29T00:00").strftime("%a %G-W%V") == "Sun 2026-W48"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            Policy(last=3),
            {
                "20261129T180000Z": ["last 1"],
                "20261129T120000Z": ["last 2"],
                "20261129T060000Z": ["last 3"],
            },
        ),
        (
            Policy(hourly=5),
            {
                "20261129T180000Z": ["hourly 1"],
                "20261129T120000Z": ["hourly 2"],
                "20261129T060000Z": ["hourly 3"],
                "20261129T000000Z": ["hourly 4"],
                "20261128T180000Z": ["hourly 5"],
            },
        ),
        (
            Policy(daily=7),
            {f"202611{29 - n}T180000Z": [f"daily {n + 1}"] for n in range(7)},
        ),
        (
            # weeks end on Sundays: 2026-11-29, -22, -15, -08
            Policy(weekly=4),
            {
                "20261129T180000Z": ["weekly 1"],
                "20261122T180000Z": ["weekly 2"],
                "20261115T180000Z": ["weekly 3"],
                "20261108T180000Z": ["weekly 4"],
            },
        ),
        (
            Policy(monthly=2),
            {"20261129T180000Z": ["monthly 1"], "20261031T180000Z": ["monthly 2"]},
        ),
        (Policy(yearly=1), {"20261129T180000Z": ["yearly 1"]}),
        (Policy(yearly=-1), {"20261129T180000Z": ["yearly 1"]}),
        (
            Policy(last=2, daily=7, weekly=4, monthly=6),
            {
                "20261129T180000Z": ["last 1", "daily 1", "weekly 1", "monthly 1"],
                "20261129T120000Z": ["last 2"],
                "20261128T180000Z": ["daily 2"],
                "20261127T180000Z": ["daily 3"],
                "20261126T180000Z": ["daily 4"],
                "20261125T180000Z": ["daily 5"],
                "20261124T180000Z": ["daily 6"],
                "20261123T180000Z": ["daily 7"],
                "20261122T180000Z": ["weekly 2"],
                "20261115T180000Z": ["weekly 3"],
                "20261108T180000Z": ["weekly 4"],
                # only two months exist of the six asked for
                "20261031T180000Z": ["monthly 2"],
            },
        ),
    ],
    ids=lambda value: value.describe() if isinstance(value, Policy) else "",
)
def test_series(policy: Policy, expected: dict[str, list[str]]) -> None:
    decisions = select(SERIES, policy)
    assert [d.seq for d in decisions] == list(range(239, -1, -1))
    assert kept(decisions) == {i: tuple(reasons) for i, reasons in expected.items()}


def test_series_unlimited() -> None:
    # -1 keeps the newest of every period there is
    daily = kept(select(SERIES, Policy(daily=-1)))
    assert len(daily) == 60
    assert all(i.endswith("T180000Z") for i in daily)
    assert daily["20261001T180000Z"] == ("daily 60",)
    assert kept(select(SERIES, Policy(hourly=-1))) == {
        b.id: (f"hourly {240 - b.seq}",) for b in SERIES
    }
    # ISO weeks 2026-W40 .. 2026-W48
    assert len(kept(select(SERIES, Policy(weekly=-1)))) == 9
    assert len(kept(select(SERIES, Policy(monthly=-1)))) == 2
    # asking for more than exist is the same as unlimited
    assert select(SERIES, Policy(daily=1000)) == select(SERIES, Policy(daily=-1))
    assert all(d.keep for d in select(SERIES, Policy(last=1000)))


# ---------------------------------------------------------------------------
# ordering, time zones, errors


def test_ties_at_the_same_second_are_ordered_by_seq() -> None:
    t = at("2026-11-23T01:38:05")
    backups = [Backup("z", t, 1), Backup("a", t, 3), Backup("m", t, 2)]
    decisions = select(backups, Policy(last=1, daily=1))
    assert [d.id for d in decisions] == ["a", "m", "z"]
    assert kept(decisions) == {"a": ("last 1", "daily 1")}


def test_time_is_bucketed_in_utc() -> None:
    plus2 = dt.timezone(dt.timedelta(hours=2))
    # 2026-12-01T01:00+02:00 is 2026-11-30T23:00Z: November, not December
    backups = [
        Backup("old", at("2026-11-30T10:00"), 1),
        Backup("new", dt.datetime(2026, 12, 1, 1, 0, tzinfo=plus2), 2),
    ]
    decisions = select(backups, Policy(monthly=2, daily=2))
    assert kept(decisions) == {"new": ("daily 1", "monthly 1")}
    assert decisions[0].time == at("2026-11-30T23:00")
    assert decisions[0].time.utcoffset() == dt.timedelta(0)


def test_no_candidates() -> None:
    assert select([], Policy(last=3)) == []
    assert table([]) == []


def test_empty_policy_is_refused() -> None:
    assert Policy().empty
    assert not Policy(yearly=-1).empty
    with pytest.raises(InvalidArgument, match=r"at least one --keep-\* option"):
        select(SERIES, Policy())
    with pytest.raises(InvalidArgument):
        select([], Policy())


@pytest.mark.parametrize("rule", ["last", "hourly", "daily", "weekly", "monthly", "yearly"])
@pytest.mark.parametrize("value", [-2, -100])
def test_negative_counts_are_refused(rule: str, value: int) -> None:
    with pytest.raises(InvalidArgument, match=f"--keep-{rule}"):
        Policy(**{rule: value})


def test_non_integer_counts_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        Policy(last="3")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Policy(daily=True)


def test_naive_time_and_duplicate_ids_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="timezone"):
        select([Backup("a", dt.datetime(2026, 1, 1), 1)], Policy(last=1))
    t = at("2026-01-01T00:00")
    with pytest.raises(InvalidArgument, match="twice"):
        select([Backup("a", t, 1), Backup("a", t, 2)], Policy(last=1))


def test_describe() -> None:
    assert Policy(last=3, daily=7).describe() == "keep-last 3, keep-daily 7"
    assert (
        Policy(yearly=1, monthly=-1, weekly=4, hourly=24).describe()
        == "keep-hourly 24, keep-weekly 4, keep-monthly unlimited, keep-yearly 1"
    )
    assert Policy().describe() == "no --keep-* option"


def test_table() -> None:
    decisions = select(small_backups(), Policy(last=1, daily=2))
    rows = table(decisions)
    assert rows[:3] == [
        ["20270104T015959Z", "2027-01-04T01:59:59Z", "keep", "last 1, daily 1"],
        ["20270104T010000Z-2", "2027-01-04T01:00:00Z", "remove", "no rule keeps it"],
        ["20270104T010000Z", "2027-01-04T01:00:00Z", "remove", "no rule keeps it"],
    ]
    assert rows[3] == ["20270103T220000Z", "2027-01-03T22:00:00Z", "keep", "daily 2"]
    assert len(rows) == 10


# ---------------------------------------------------------------------------
# parse_backup_time


def test_parse_backup_time() -> None:
    want = at("2026-11-23T01:38:05")
    assert parse_backup_time("20261123T013805Z", "2026-11-23T01:38:05Z") == want
    # started wins over the id
    assert parse_backup_time("20000101T000000Z", "2026-11-23T01:38:05Z") == want
    # other ISO forms: converted to UTC
    assert parse_backup_time("x", "2026-11-23T03:38:05+02:00") == want
    assert parse_backup_time("x", "2026-11-23T01:38:05") == want
    # fall back to the id, with or without a -N suffix
    assert parse_backup_time("20261123T013805Z", "") == want
    assert parse_backup_time("20261123T013805Z-2", None) == want
    assert parse_backup_time("20261123T013805Z-12", "garbage") == want
    t = parse_backup_time("20261123T013805Z", "2026-11-23T01:38:05Z")
    assert t.tzinfo is not None and t.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    ("backup_id", "started"),
    [
        ("garbage", ""),
        ("garbage", "not a time"),
        ("20261123T013805", ""),  # no Z
        ("20261123T013805Z-0", ""),
        ("20261323T013805Z", ""),  # month 13
    ],
)
def test_parse_backup_time_errors(backup_id: str, started: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_backup_time(backup_id, started)


# ---------------------------------------------------------------------------
# properties

times = st.datetimes(
    min_value=dt.datetime(2024, 12, 25),
    max_value=dt.datetime(2025, 1, 10),
    timezones=st.just(UTC),
).map(lambda t: t.replace(microsecond=0))
# few distinct values, so that ties (same second, same day) are common
coarse_times = st.sampled_from(
    [at("2025-01-01T00:00") + dt.timedelta(hours=9 * n) for n in range(20)]
)
backup_lists = st.lists(st.one_of(times, coarse_times), max_size=40).map(
    lambda ts: [Backup(f"b{seq}", t, seq) for seq, t in enumerate(ts)]
)
counts = st.one_of(st.integers(min_value=1, max_value=12), st.just(-1))


def newest_first(backups: list[Backup]) -> list[Backup]:
    return sorted(backups, key=lambda b: (b.time, b.seq), reverse=True)


@settings(max_examples=300, deadline=None)
@given(backups=backup_lists, n=counts)
def test_property_keep_last(backups: list[Backup], n: int) -> None:
    decisions = select(backups, Policy(last=n))
    assert [d.id for d in decisions] == [b.id for b in newest_first(backups)]
    want = newest_first(backups) if n == -1 else newest_first(backups)[:n]
    by_last = {d.id for d in decisions if any(r.startswith("last ") for r in d.reasons)}
    assert by_last == {b.id for b in want}
    for d in decisions:
        if d.keep:
            rank = [b.id for b in newest_first(backups)].index(d.id)
            assert d.reasons == (f"last {rank + 1}",)


@settings(max_examples=300, deadline=None)
@given(backups=backup_lists, n=counts, last=st.integers(min_value=0, max_value=3))
def test_property_keep_daily(backups: list[Backup], n: int, last: int) -> None:
    decisions = select(backups, Policy(last=last, daily=n))
    by_daily = [d for d in decisions if any(r.startswith("daily ") for r in d.reasons)]
    days = sorted({b.time.date() for b in backups}, reverse=True)
    wanted_days = days if n == -1 else days[:n]
    assert len({d.time.date() for d in by_daily}) == len(by_daily) <= len(wanted_days)
    # the newest backup of each of the N newest days, in order, numbered 1..
    newest_of_day = {}
    for b in newest_first(backups):
        newest_of_day.setdefault(b.time.date(), b)
    assert [d.id for d in by_daily] == [newest_of_day[day].id for day in wanted_days]
    for slot, d in enumerate(by_daily, start=1):
        assert f"daily {slot}" in d.reasons
    # keep-last is independent of keep-daily
    by_last = {d.id for d in decisions if any(r.startswith("last ") for r in d.reasons)}
    assert by_last == {b.id for b in newest_first(backups)[:last]}
    assert {d.id for d in decisions if d.keep} == by_last | {d.id for d in by_daily}


@settings(max_examples=200, deadline=None)
@given(
    backups=backup_lists,
    policy=st.builds(
        Policy,
        last=st.integers(-1, 4),
        hourly=st.integers(-1, 4),
        daily=st.integers(-1, 4),
        weekly=st.integers(-1, 4),
        monthly=st.integers(-1, 4),
        yearly=st.integers(-1, 4),
    ).filter(lambda p: not p.empty),
    seed=st.integers(0, 1000),
)
def test_property_any_policy(backups: list[Backup], policy: Policy, seed: int) -> None:
    decisions = select(backups, policy)
    shuffled = list(backups)
    random.Random(seed).shuffle(shuffled)
    assert select(shuffled, policy) == decisions  # input order does not matter
    assert [d.id for d in decisions] == [b.id for b in newest_first(backups)]
    if backups:
        assert decisions[0].keep  # the newest is always kept by a non-empty policy
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        limit = getattr(policy, rule)
        slots = [r for d in decisions for r in d.reasons if r.split()[0] == rule]
        # each rule fills its slots 1, 2, ... in newest-first order, at most N
        assert slots == [f"{rule} {k}" for k in range(1, len(slots) + 1)]
        if limit >= 0:
            assert len(slots) <= limit
    for d in decisions:
        assert d.keep == bool(d.reasons)
