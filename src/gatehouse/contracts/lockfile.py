"""``contracts.lock``: the released contract versions, their signatures and their files' checksums.

Releasing is ``gatehouse lock``: every contract version in the lock is released, and a released version
never changes (``gatehouse check`` compares both its file and its live signature with the lock). The
file is TOML, written deterministically (entries sorted by contract and version, columns in the view's
order, relations sorted) so that a release is a small, reviewable diff in a pull request::

    [lock]
    format = 1

    [[contracts]]
    contract = "products"
    version = 1
    database = "shop"
    file = "contracts/products.v1.sql"
    checksum = { algorithm = "sha256", value = "5d1c…" }
    columns = [
        { name = "id", type = "bigint", nullable = false },
        { name = "price", type = "numeric(10,2)", nullable = true },
    ]
    relations = [
        { target = "order_items", columns = ["id"], target_columns = ["product_id"], to_one = false },
    ]

The checksum names its algorithm so a later gatehouse can switch algorithms and still verify old locks.

**Declared nullability.** PostgreSQL reports every view column as nullable, so a contract declares the
columns that are never null in a header comment, ``-- not null: id, name`` (one or more such lines among
the file's leading comments). Making a column nullable later is a breaking change. A new version whose
promise its tables do not keep (a nullable base column, an outer join) is not released: recording the
column as nullable would release a weaker promise than the file makes, without anyone noticing.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gatehouse.contracts.compat import compare, describe_changes, is_breaking
from gatehouse.contracts.shape import Column, CompileError, RelationRef, Signature
from gatehouse.contracts.signature import LiveSignatures, NullablePromise
from gatehouse.errors import ProjectError
from gatehouse.project import Project

LOCK_FILE = "contracts.lock"
LOCK_FORMAT = 1
DEFAULT_ALGORITHM = "sha256"
CHECKSUM_ALGORITHMS: dict[str, Callable[[bytes], str]] = {
    "sha256": lambda data: hashlib.sha256(data).hexdigest(),
}
"""Algorithm name → function of the file's bytes. Add, never change or remove: old locks name theirs."""

HEADER = """\
# contracts.lock: the released contract versions, written by `gatehouse lock`.
# A released version never changes: `gatehouse check` compares each contract file and its live signature
# with this file. Review changes here like code; do not edit by hand.
"""


# --- declared nullability ------------------------------------------------------------------------------


# --- the model ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checksum:
    algorithm: str
    value: str


def file_checksum(path: Path, algorithm: str = DEFAULT_ALGORITHM) -> Checksum:
    """The checksum of the file's bytes; :class:`KeyError` for an algorithm this gatehouse does not know."""
    return Checksum(algorithm, CHECKSUM_ALGORITHMS[algorithm](path.read_bytes()))


@dataclass(frozen=True, slots=True)
class LockEntry:
    signature: Signature
    file: str
    """The contract file, relative to the project folder (for messages; the label is the key)."""
    checksum: Checksum

    @property
    def label(self) -> str:
        return self.signature.label


@dataclass(frozen=True, slots=True)
class Lock:
    entries: tuple[LockEntry, ...] = ()
    format: int = LOCK_FORMAT

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.entries, key=lambda e: (e.signature.contract, e.signature.version)))
        object.__setattr__(self, "entries", ordered)

    def get(self, label: str) -> LockEntry | None:
        return next((e for e in self.entries if e.label == label), None)

    @property
    def labels(self) -> frozenset[str]:
        return frozenset(e.label for e in self.entries)

    @property
    def released_api_version(self) -> int:
        """The newest released API version: the highest contract version number in the lock (0 if none)."""
        return max((e.signature.version for e in self.entries), default=0)


# --- TOML -----------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ColumnModel(_Strict):
    name: str
    type: str
    nullable: bool


class _RelationModel(_Strict):
    target: str
    columns: tuple[str, ...]
    target_columns: tuple[str, ...]
    to_one: bool


class _ChecksumModel(_Strict):
    algorithm: str
    value: str


class _EntryModel(_Strict):
    contract: str
    version: int = Field(ge=1)
    database: str
    file: str
    checksum: _ChecksumModel
    columns: tuple[_ColumnModel, ...]
    relations: tuple[_RelationModel, ...] = ()


class _HeaderModel(_Strict):
    format: int


class _LockModel(_Strict):
    lock: _HeaderModel
    contracts: tuple[_EntryModel, ...] = ()


def lock_path(root: Path) -> Path:
    return root / LOCK_FILE


def parse_lock(text: str, *, where: str = LOCK_FILE) -> Lock:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProjectError(f"not valid TOML: {exc}", where=where,
                           hint="restore it from version control, or write it again with `gatehouse lock`") from None
    header = data.get("lock")
    if isinstance(header, Mapping) and isinstance(header.get("format"), int) and header["format"] > LOCK_FORMAT:
        raise ProjectError(f"written in lock format {header['format']}; this gatehouse reads format {LOCK_FORMAT}",
                           where=where, hint="upgrade gatehouse")
    try:
        model = _LockModel.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"[{'.'.join(str(p) for p in e['loc'])}] {e['msg']}"
                             for e in exc.errors(include_url=False))
        raise ProjectError(f"not a valid lock file: {problems}", where=where) from None
    entries = []
    seen: set[tuple[str, int]] = set()
    for item in model.contracts:
        if (item.contract, item.version) in seen:
            raise ProjectError(f"{item.contract}.v{item.version} is locked twice", where=where)
        seen.add((item.contract, item.version))
        signature = Signature(
            item.contract, item.version, item.database,
            tuple(Column(c.name, c.type, c.nullable) for c in item.columns),
            tuple(sorted(RelationRef(r.target, r.columns, r.target_columns, r.to_one) for r in item.relations)),
        )
        entries.append(LockEntry(signature, item.file, Checksum(item.checksum.algorithm, item.checksum.value)))
    return Lock(tuple(entries), model.lock.format)


def read_lock(root: Path) -> Lock | None:
    """The project's lock, or None when nothing was ever released (no file)."""
    path = lock_path(root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return parse_lock(text, where=str(path))


def _string(value: str) -> str:
    # A JSON string is a valid TOML basic string, except that TOML also wants DEL escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _strings(values: Iterable[str]) -> str:
    return "[" + ", ".join(_string(v) for v in values) + "]"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, tuple | list):
        return _strings(value)
    raise TypeError(f"no TOML for {type(value).__name__}")


def _inline(pairs: Mapping[str, Any]) -> str:
    return "{ " + ", ".join(f"{key} = {_value(v)}" for key, v in pairs.items()) + " }"


def _array(name: str, rows: list[str]) -> list[str]:
    if not rows:
        return [f"{name} = []"]
    return [f"{name} = [", *(f"    {row}," for row in rows), "]"]


def dumps_lock(lock: Lock) -> str:
    lines = [HEADER, "[lock]", f"format = {lock.format}"]
    for entry in lock.entries:
        sig = entry.signature
        lines += ["", "[[contracts]]", f"contract = {_string(sig.contract)}", f"version = {sig.version}",
                  f"database = {_string(sig.database)}", f"file = {_string(entry.file)}",
                  "checksum = " + _inline({"algorithm": entry.checksum.algorithm, "value": entry.checksum.value})]
        lines += _array("columns", [_inline({"name": c.name, "type": c.type, "nullable": c.nullable})
                                    for c in sig.columns])
        lines += _array("relations", [_inline({"target": r.target, "columns": r.columns,
                                               "target_columns": r.target_columns, "to_one": r.to_one})
                                      for r in sorted(sig.relations)])
    return "\n".join(lines) + "\n"


def write_lock(root: Path, lock: Lock) -> bool:
    """Write the lock; returns False (and leaves the file alone) when it would not change."""
    path = lock_path(root)
    text = dumps_lock(lock)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True


# --- releasing ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LockReport:
    """What ``gatehouse lock`` did. When anything was refused or failed, nothing was written."""

    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    updated: list[tuple[str, str]] = field(default_factory=list)
    """(label, changes) of released versions whose file is unchanged and whose signature changed compatibly."""
    dropped: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(label, why) of released versions that changed, or new versions numbered too low (--force allows those),
    or new versions whose ``-- not null:`` promise the tables do not keep (never released so)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(label, PostgreSQL's message) of versions that do not compile: no signature, so they cannot be locked."""

    @property
    def ok(self) -> bool:
        return not self.refused and not self.failed

    def lines(self) -> list[str]:
        out = [f"released {label}" for label in self.added]
        out += [f"re-locked {label} (--force)" for label in self.rewritten]
        out += [f"updated {label}: {changes} (compatible)" for label, changes in self.updated]
        out += [f"dropped {label} from the lock (its file is gone; --force)" for label in self.dropped]
        out += [f"refused {label}: {why}" for label, why in self.refused]
        out += [f"cannot lock {label}: it does not compile: {message}" for label, message in self.failed]
        if not out:
            out.append(f"nothing to change ({len(self.unchanged)} released contract versions)")
        return out


def _relative(project: Project, path: Path) -> str:
    try:
        return path.resolve().relative_to(project.root).as_posix()
    except ValueError:
        return path.as_posix()


def _promise_refusal(relative: str, broken: Iterable[NullablePromise]) -> str:
    return "; ".join(f"`-- not null:` promises {p.column}, but it can be null: it {p.why}; releasing it would "
                     f"record {p.column} as nullable: {p.fix(f'in {relative}')}" for p in broken)


def update_lock(project: Project, signatures: Mapping[str, Signature | CompileError], existing: Lock | None,
                *, force: bool = False) -> tuple[Lock, LockReport]:
    """Release every contract version of ``signatures`` not yet in the lock; keep the released ones.

    Refused without ``force``: a released version whose file checksum differs from the lock or whose
    signature changed incompatibly (:mod:`gatehouse.contracts.compat`), and a new version numbered at or
    below the newest released API version (it would change a released API version). A compatible change
    with the file unchanged (e.g. a relation gained from a new contract) is recorded. A version that does
    not compile is never locked. All or nothing: if anything is refused or fails, the returned lock is
    ``existing`` unchanged. With ``force``, entries whose file is gone are dropped (do this only for
    versions whose API versions are all retired).

    Refused even with ``force``: a new version whose ``-- not null:`` promises a column its lineage says can
    be null, when ``signatures`` carry the promises (:class:`~gatehouse.contracts.signature.LiveSignatures`,
    as :func:`~gatehouse.contracts.signature.project_signatures` gives them). Its signature shows the column
    nullable, so releasing it would record a weaker promise than the file makes; the fix is in the table (a
    migration adding NOT NULL) or in the file. A released version is judged by :func:`compare` instead (a
    column that became nullable is breaking).
    """
    report = LockReport()
    promises = signatures.promises if isinstance(signatures, LiveSignatures) else {}
    old = existing or Lock()
    released = old.released_api_version
    contracts = {c.label: c for c in project.contracts}
    kept: dict[str, LockEntry] = {e.label: e for e in old.entries}
    for label in sorted(signatures):
        live = signatures[label]
        contract = contracts.get(label)
        if not isinstance(live, Signature):
            report.failed.append((label, live.message))
            continue
        if contract is None:
            continue
        previous = kept.get(label)
        algorithm = previous.checksum.algorithm if previous else DEFAULT_ALGORITHM
        if algorithm not in CHECKSUM_ALGORITHMS:
            algorithm = DEFAULT_ALGORITHM
        entry = LockEntry(live, _relative(project, contract.path), file_checksum(contract.path, algorithm))
        if previous is None:
            refusals = [_promise_refusal(entry.file, promises[label])] if promises.get(label) else []
            if existing is not None and live.version <= released and not force:
                refusals.append(f"API v{released} is already released; a new contract version needs a number "
                                f"above {released} ({live.contract}.v{released + 1})")
            if refusals:
                report.refused.append((label, "; ".join(refusals)))
                continue
            kept[label] = entry
            report.added.append(label)
            continue
        changes = compare(previous.signature, live)
        why = ["its file changed since it was released"] if previous.checksum != entry.checksum else []
        if is_breaking(changes):
            why.append("its signature changed: " + describe_changes(c for c in changes if c.breaking))
        if not changes and not why:
            report.unchanged.append(label)
        elif not why:  # same file, compatible change (a relation gained from a new contract, say): record it
            kept[label] = entry
            report.updated.append((label, describe_changes(changes)))
        elif force:
            kept[label] = entry
            report.rewritten.append(label)
        else:
            report.refused.append((label, "; ".join(why) + " (a released version never changes; put the change in "
                                          "a new version, or pass --force if you are sure)"))
    if force:
        for label, entry in list(kept.items()):
            if label not in contracts and not (project.root / entry.file).exists():
                del kept[label]
                report.dropped.append(label)
    if not report.ok:
        return old, report
    return Lock(tuple(kept.values())), report
