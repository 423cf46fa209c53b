"""Which backups ``blksnap prune`` keeps: the ``--keep-*`` retention policy.

Pure selection logic, with the semantics of restic's ``forget`` (and of
Proxmox Backup Server's prune): the candidates are walked newest first;

* ``keep-last N`` keeps the N newest;
* each period rule (``hourly``, ``daily``, ``weekly`` -- ISO 8601 weeks --,
  ``monthly``, ``yearly``), evaluated on the backups' UTC start time, keeps
  a backup when its period differs from the period of the last backup that
  rule kept -- the newest backup of each period -- until it kept N of them.

The rules are independent: a backup may be kept by several of them, and
every reason is recorded (``"last 1"``, ``"daily 3"`` ... the number says
which of the rule's N slots it filled, 1 = the newest). A rule given as
``-1`` is unlimited: it keeps the newest backup of every period (for
``keep-last``, every backup).

Only usable backups are candidates; deciding what to do with failed or
damaged ones is the caller's business.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Protocol

from blksnap.errors import InvalidArgument

UTC = _dt.UTC

#: ``-1`` given to a rule: no limit.
UNLIMITED = -1

#: The rules, in the order their reasons are listed.
RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

#: A backup id: its start second, and ``-N`` when that second was taken.
_ID_RE = re.compile(r"^(\d{8}T\d{6})Z(?:-[1-9]\d*)?$")
_ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class Candidate(Protocol):
    """What :func:`select` needs of a backup."""

    @property
    def id(self) -> str: ...

    @property
    def time(self) -> _dt.datetime: ...

    @property
    def seq(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Backup:
    """A plain :class:`Candidate`."""

    id: str
    time: _dt.datetime
    seq: int


@dataclasses.dataclass(frozen=True)
class Policy:
    """How many backups (``last``) or periods each rule keeps; -1 = unlimited."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for rule in RULES:
            value = getattr(self, rule)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"--keep-{rule}: not an integer: {value!r}")
            if value < UNLIMITED:
                raise InvalidArgument(
                    f"--keep-{rule} {value}: must be a count >= 0, or -1 for unlimited"
                )

    @property
    def empty(self) -> bool:
        """No rule keeps anything."""
        return all(getattr(self, rule) == 0 for rule in RULES)

    def describe(self) -> str:
        """``"keep-last 3, keep-daily 7"``; ``-1`` reads ``unlimited``."""
        parts = []
        for rule in RULES:
            value = getattr(self, rule)
            if value:
                count = "unlimited" if value == UNLIMITED else str(value)
                parts.append(f"keep-{rule} {count}")
        return ", ".join(parts) if parts else "no --keep-* option"


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the policy does with one backup, and why."""

    id: str
    seq: int
    time: _dt.datetime  # UTC
    keep: bool
    reasons: tuple[str, ...]


def _bucket_last(t: _dt.datetime) -> Hashable:
    # Never equal to another backup's: every backup is its own period.
    return object()


#: The period of a UTC time, per rule.
_BUCKETS: dict[str, Callable[[_dt.datetime], Hashable]] = {
    "last": _bucket_last,
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),  # %Y-%m-%d %H
    "daily": lambda t: (t.year, t.month, t.day),  # %Y-%m-%d
    "weekly": lambda t: tuple(t.isocalendar())[:2],  # %G-W%V
    "monthly": lambda t: (t.year, t.month),  # %Y-%m
    "yearly": lambda t: t.year,  # %Y
}


def _utc(backup_id: str, t: _dt.datetime) -> _dt.datetime:
    if not isinstance(t, _dt.datetime):
        raise InvalidArgument(f"backup {backup_id}: time is not a datetime: {t!r}")
    if t.tzinfo is None or t.utcoffset() is None:
        raise InvalidArgument(f"backup {backup_id}: time has no timezone: {t.isoformat()}")
    return t.astimezone(UTC)


def select(candidates: Iterable[Candidate], policy: Policy) -> list[Decision]:
    """Apply ``policy`` to ``candidates``: one :class:`Decision` each, newest first.

    Newest means the highest ``(time, seq)``. Raises :class:`InvalidArgument`
    for an empty policy, a naive time, or an id given twice.
    """
    if policy.empty:
        raise InvalidArgument(
            "refusing to prune with an empty policy: give at least one --keep-* option "
            "(--keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, "
            "--keep-yearly)"
        )
    items = [(_utc(c.id, c.time), c.seq, c.id) for c in candidates]
    seen: set[str] = set()
    for _, _, backup_id in items:
        if backup_id in seen:
            raise InvalidArgument(f"backup {backup_id} given twice")
        seen.add(backup_id)
    items.sort(key=lambda item: (item[0], item[1]), reverse=True)

    rules = [rule for rule in RULES if getattr(policy, rule)]
    left = {rule: getattr(policy, rule) for rule in rules}  # -1 stays -1: unlimited
    filled = dict.fromkeys(rules, 0)
    last_bucket: dict[str, Hashable] = {}

    decisions = []
    for t, seq, backup_id in items:
        reasons = []
        for rule in rules:
            if left[rule] == 0:
                continue
            bucket = _BUCKETS[rule](t)
            if rule in last_bucket and last_bucket[rule] == bucket:
                continue
            last_bucket[rule] = bucket
            filled[rule] += 1
            if left[rule] > 0:
                left[rule] -= 1
            reasons.append(f"{rule} {filled[rule]}")
        decisions.append(Decision(backup_id, seq, t, bool(reasons), tuple(reasons)))
    return decisions


def format_time(t: _dt.datetime) -> str:
    """``2026-11-23T01:38:05Z``: the manifest's form of a time (to the second, UTC)."""
    return t.astimezone(UTC).strftime(_ISO_FORMAT)


def table(decisions: Sequence[Decision]) -> list[list[str]]:
    """Rows ``[id, time, "keep"/"remove", reasons]`` for the CLI to print."""
    return [
        [
            d.id,
            format_time(d.time),
            "keep" if d.keep else "remove",
            ", ".join(d.reasons) or "no rule keeps it",
        ]
        for d in decisions
    ]


def parse_backup_time(backup_id: str, started: str | None) -> _dt.datetime:
    """A backup's start time, aware UTC.

    From the manifest's ``started`` (``2026-11-23T01:38:05Z``; other ISO 8601
    forms with an offset are accepted, a time without one is taken as UTC);
    when that is missing or unreadable, from the id (``20261123T013805Z``,
    maybe with a ``-2`` ... suffix). :class:`InvalidArgument` if neither parses.
    """
    if started:
        text = started.strip()
        try:
            return _dt.datetime.strptime(text, _ISO_FORMAT).replace(tzinfo=UTC)
        except ValueError:
            pass
        try:
            t = _dt.datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    m = _ID_RE.match(backup_id)
    if m:
        try:
            return _dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
        except ValueError:
            pass
    raise InvalidArgument(
        f"backup {backup_id}: no start time: started {started!r}, and the id is not a time"
    )
