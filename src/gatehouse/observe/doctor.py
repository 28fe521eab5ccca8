"""``gatehouse doctor``: the checks a person runs when something is wrong, in the order they would run them.

The model is small on purpose:

* a :class:`Check` is one question about one *target* (a database of the project, ``shop``, or one of its
  replicas, ``shop/r1``), asked by an async function that answers with an :class:`Outcome`: ``ok``, ``warn``
  or ``fail``, a one-line reason, what to do (the hint), and optional detail lines and numbers;
* a check *needs* earlier ones (no TLS question without a login); when one of them did not pass, it is
  reported as ``skip`` with the reason, never run against a connection that is not there;
* every check runs under its own time limit (``--timeout``, plus a second of grace so a check's own, better
  worded timeout wins); a check that overruns is a ``fail`` and its target's connection is dropped, so a
  hung server costs one timeout per target, not a hang;
* :class:`Report` is the list of results in order, with the exit code (1 when anything failed; warnings
  alone exit 0) and the JSON and table forms.

The checks themselves live in :mod:`.doctor_checks` (connection), :mod:`.doctor_drift` (the project
applied), :mod:`.doctor_capacity` (connections, disk, pools), :mod:`.doctor_activity` (transactions, locks,
slow statements) and :mod:`.doctor_replicas`; :mod:`.doctor_plan` puts them in order.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from gatehouse.db.connection_errors import ConnectionFailed
from gatehouse.errors import GatehouseError

Status = Literal["ok", "warn", "fail", "skip"]
GRACE_S = 1.0
"""How much longer than ``--timeout`` a check may run before it is stopped (its own timeouts say more)."""
PASSED: frozenset[Status] = frozenset({"ok", "warn"})
SEVERITY: dict[Status, int] = {"skip": 0, "ok": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True, slots=True)
class Options:
    """What ``gatehouse doctor`` was asked for (durations in seconds)."""

    timeout_s: float = 5.0
    instances: int = 1
    max_lag_s: float = 10.0
    fail_lag_s: float = 60.0
    long_s: float = 60.0
    slow_s: float = 1.0
    databases: tuple[str, ...] = ()
    """Only these databases of the project (empty: all)."""

    def as_json(self) -> dict[str, Any]:
        return {"timeout_s": self.timeout_s, "instances": self.instances, "max_lag_s": self.max_lag_s,
                "fail_lag_s": self.fail_lag_s, "long_s": self.long_s, "slow_s": self.slow_s,
                "databases": list(self.databases)}


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    reason: str
    hint: str | None = None
    details: tuple[str, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)


def ok(reason: str, *, hint: str | None = None, details: Iterable[str] = (),
       data: Mapping[str, Any] | None = None) -> Outcome:
    return Outcome("ok", reason, hint, tuple(details), data or {})


def warn(reason: str, *, hint: str | None = None, details: Iterable[str] = (),
         data: Mapping[str, Any] | None = None) -> Outcome:
    return Outcome("warn", reason, hint, tuple(details), data or {})


def fail(reason: str, *, hint: str | None = None, details: Iterable[str] = (),
         data: Mapping[str, Any] | None = None) -> Outcome:
    return Outcome("fail", reason, hint, tuple(details), data or {})


def worst(*statuses: Status) -> Status:
    """The most severe of ok / warn / fail (``ok`` when none is given)."""
    return max(statuses, key=lambda s: SEVERITY[s], default="ok")


class Skipped(Exception):
    """Raised by a check that finds it cannot be asked now (e.g. its connection was dropped after a timeout)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    title: str
    target: str
    run: Callable[[], Awaitable[Outcome]]
    needs: tuple[tuple[str, str], ...] = ()
    """(check name, target) pairs that must have passed (ok or warn) before this one is asked."""
    on_timeout: Callable[[], None] | None = None
    """Called when the check overran: drop the connection it was using, so later checks do not wait on it."""


@dataclass(frozen=True, slots=True)
class Result:
    check: str
    title: str
    target: str
    status: Status
    reason: str
    hint: str | None = None
    details: tuple[str, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def database(self) -> str:
        return self.target.partition("/")[0]

    def as_json(self) -> dict[str, Any]:
        return {"check": self.check, "title": self.title, "database": self.database, "target": self.target,
                "status": self.status, "reason": self.reason, "hint": self.hint, "details": list(self.details),
                "data": dict(self.data), "seconds": round(self.seconds, 4)}


@dataclass(frozen=True, slots=True)
class Report:
    project: str
    results: tuple[Result, ...]
    options: Options = Options()

    @property
    def status(self) -> Status:
        return worst(*(r.status for r in self.results))

    @property
    def exit_code(self) -> int:
        return 1 if self.status == "fail" else 0

    def counts(self) -> dict[str, int]:
        counted = {"ok": 0, "warn": 0, "fail": 0, "skip": 0}
        for result in self.results:
            counted[result.status] += 1
        return counted

    def result(self, check: str, target: str | None = None) -> Result:
        """The result of one check (on the first target that has it when ``target`` is not given)."""
        for result in self.results:
            if result.check == check and (target is None or result.target == target):
                return result
        raise KeyError(f"{check} on {target or 'any target'}")

    def as_json(self) -> dict[str, Any]:
        return {"project": self.project, "status": self.status, "exit_code": self.exit_code,
                "counts": self.counts(), "options": self.options.as_json(),
                "checks": [r.as_json() for r in self.results]}

    def summary(self) -> str:
        counts = self.counts()
        parts = [f"{counts['fail']} failed" if counts["fail"] else "",
                 f"{counts['warn']} warning{'s' if counts['warn'] != 1 else ''}" if counts["warn"] else "",
                 f"{counts['ok']} ok", f"{counts['skip']} skipped" if counts["skip"] else ""]
        return ", ".join(p for p in parts if p)


def _skip_reason(check: Check, done: dict[tuple[str, str], Result]) -> str | None:
    for need in check.needs:
        earlier = done.get(need)
        if earlier is None:
            continue  # not part of this run (e.g. a check left out): nothing to wait for
        if earlier.status == "skip":
            return earlier.reason  # the first cause, passed down the line
        if earlier.status == "fail":
            where = "" if earlier.target == check.target else f" on {earlier.target}"
            return f"skipped: the {earlier.title} check{where} failed"
    return None


async def _ask(check: Check, timeout_s: float) -> Outcome:
    limit = timeout_s + GRACE_S
    try:
        async with asyncio.timeout(limit):
            return await check.run()
    except Skipped as skipped:
        return Outcome("skip", skipped.reason)
    except TimeoutError:
        if check.on_timeout is not None:
            check.on_timeout()
        return fail(f"no answer within {timeout_s:g} s",
                    hint="the server is overloaded or hung: look at its log and its load; raise --timeout to wait "
                         "longer")
    except ConnectionFailed as exc:
        return fail(exc.happened, hint=exc.check)
    except GatehouseError as exc:
        return fail(str(exc).splitlines()[0], hint=getattr(exc, "hint", None))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        if check.on_timeout is not None and isinstance(exc, (asyncpg.InterfaceError, OSError)):
            check.on_timeout()  # the connection is not usable any more
        return fail(f"the server answered with an error: {_first_line(exc)}",
                    hint="the server's log says more; run doctor again once it answers")
    except Exception as exc:  # one check's bug must not cost the answers of all the others
        return fail(f"the check itself failed: {type(exc).__name__}: {_first_line(exc)}",
                    hint="this is a bug in gatehouse doctor: please report it with this line")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


async def run_checks(checks: Iterable[Check], options: Options,
                     on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Ask every check in order (skipping those whose needs did not pass); ``on_result`` hears each answer."""
    done: dict[tuple[str, str], Result] = {}
    results: list[Result] = []
    for check in checks:
        started = time.perf_counter()
        reason = _skip_reason(check, done)
        outcome = Outcome("skip", reason) if reason is not None else await _ask(check, options.timeout_s)
        result = Result(check.name, check.title, check.target, outcome.status, outcome.reason, outcome.hint,
                        outcome.details, outcome.data, time.perf_counter() - started)
        done[(check.name, check.target)] = result
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


# --- words and numbers ------------------------------------------------------------------------------------


def seconds_text(seconds: float) -> str:
    """``0.4 ms``, ``12 ms``, ``3.2 s``, ``2 min 5 s``, ``3 h 10 min``."""
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds == int(seconds) else f"{seconds:.1f} s"
    if seconds < 3600:
        rest = int(seconds % 60)
        return f"{int(seconds // 60)} min" + (f" {rest} s" if rest else "")
    rest = int(seconds % 3600 // 60)
    return f"{int(seconds // 3600)} h" + (f" {rest} min" if rest else "")


def bytes_text(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # (not reached)


def percent_text(fraction: float) -> str:
    return f"{fraction * 100:.0f} %"


_STRING = re.compile(r"'(?:[^']|'')*'")
_NUMBER = re.compile(r"(?<![\w$.])\d+(?:\.\d+)?(?![\w.])")
_SPACE = re.compile(r"\s+")


def statement_text(query: str | None, limit: int = 120) -> str:
    """A statement as a report may show it: on one line, shortened, with literal strings and numbers masked
    (a statement seen in ``pg_stat_activity`` holds the values a caller sent)."""
    if not query:
        return "(statement not visible to this user)"
    if query.startswith("<"):
        return query  # <insufficient privilege>, <IDLE>...
    text = _NUMBER.sub("?", _STRING.sub("'?'", _SPACE.sub(" ", query).strip()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the table ----------------------------------------------------------------------------------------------

STATUS_WORD: dict[Status, str] = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


LABEL_WIDTH = 13
"""Wide enough for every check's name (``authenticator``) and a replica's (``replica r16``)."""


def result_lines(result: Result, *, previous: Result | None = None) -> list[tuple[Status, str]]:
    """One check as aligned lines, each with the status that colours it: a heading when a new database starts,
    ``FAIL  authenticator  reason``, its detail lines and, for a warning or failure, its hint (after →)."""
    lines: list[tuple[Status, str]] = []
    if previous is None or previous.database != result.database:
        if previous is not None:
            lines.append(("ok", ""))
        lines.append(("ok", result.database))
    indent = " " * (6 + LABEL_WIDTH + 2)
    lines.append((result.status, f"{STATUS_WORD[result.status]:<5} {_label(result):<{LABEL_WIDTH}}  {result.reason}"))
    if result.status != "skip":  # (a detail the reason already says is not said twice)
        lines += [(result.status, f"{indent}{line}") for line in result.details if line not in result.reason]
    if result.hint and result.status in ("warn", "fail"):
        lines.append((result.status, f"{indent}→ {result.hint}"))
    return lines


def table_lines(report: Report) -> list[tuple[Status, str]]:
    """The whole report as :func:`result_lines`, then the summary."""
    lines: list[tuple[Status, str]] = []
    previous = None
    for result in report.results:
        lines += result_lines(result, previous=previous)
        previous = result
    return [*lines, ("ok", ""), (report.status, report.summary())]


def _label(result: Result) -> str:
    suffix = result.target.partition("/")[2]
    return f"{result.check} {suffix}" if suffix else result.check
