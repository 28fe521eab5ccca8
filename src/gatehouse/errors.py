"""One error tree for everything gatehouse reports.

Two families:

* :class:`ProjectError` — a mistake in the project folder or the command line, reported by the CLI with
  the file, the key or line, and what to do. Never reaches HTTP.
* :class:`ApiError` — an error answered over HTTP in PostgREST's shape ``{code, message, details, hint}``
  with a status. Codes follow PostgREST where the meaning is the same (``PGRST1xx`` request, ``PGRST2xx``
  schema cache, ``PGRST3xx`` authentication) so its clients parse them; ``GH`` codes are gatehouse's own
  (``GH`` and the status), and SQLSTATEs are PostgreSQL's.

How the :class:`ApiError` tree is kept (``tests/test_errors.py`` walks it):

* One class per condition, named after it. Its status and code are class attributes; raising it takes a
  message, details, hint and headers, never a status or a code, so the two cannot drift apart. The two
  classes whose status is chosen per instance say why: :class:`DatabaseError` (PostgreSQL's SQLSTATE decides)
  and :class:`LogicError` (the logic function's author decides).
* A code is declared by exactly one class. Conditions that share a code (PostgREST's ``PGRST102`` covers every
  body it cannot read) are subclasses of the class that declares it, which says what they have in common, and
  they keep its status.
* A class marked ``@abstract`` is never raised itself: it gives a family its status (and code).
* Statuses are 4xx and 5xx, except :class:`AmbiguousRelationship`'s 300, which is PostgREST's own answer.
* Every class lives here, grouped under ``# ---`` comments, so this file is the list of what a client can be
  told; modules that raise one re-export it where their callers import it from.

Nothing in an ApiError may contain SQL, a stack trace, a secret or a private table name: messages are
written here or at the raise, built from names the caller already used; PostgreSQL's own text only ever
reaches ``details`` with the ``debug`` setting on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar


class GatehouseError(Exception):
    """Root of every error gatehouse raises on purpose."""


class ProjectError(GatehouseError):
    """The project folder (or a command's arguments) is wrong; the message says where and what to do."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.where = where
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        text = f"{self.where}: {self.args[0]}" if self.where else str(self.args[0])
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class DatabaseUnavailable(GatehouseError):
    """A database could not be reached or started."""


class PoolerMisconfigured(DatabaseUnavailable):
    """A connection through the pooler (``pooler_url``) does not run as the app's role: its database for the app
    is missing its ``connect_query``, or sets another role. Never served: the app would run as someone else."""


_E = TypeVar("_E", bound="type[ApiError]")
ABSTRACT: set[type[ApiError]] = set()
"""Classes of the tree that are never raised themselves: they give their subclasses a status (and a code)."""


def abstract(cls: _E) -> _E:
    ABSTRACT.add(cls)
    return cls


@abstract
class ApiError(GatehouseError):
    """An error answered over HTTP in PostgREST's JSON shape. Raise one of its subclasses."""

    status: int
    code: str

    def __init__(
        self,
        message: str,
        *,
        details: str | None = None,
        hint: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.hint = hint
        self.headers = headers or {}
        if type(self) in ABSTRACT:
            raise TypeError(f"{type(self).__name__} is not raised itself; raise the class of the condition")

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details, "hint": self.hint}


# --- 400: the URL and the query string (parsed before any database work) -----------------------------


class QueryParseError(ApiError):
    """The query string does not follow PostgREST's grammar, or names something the grammar cannot take (a
    negative limit or offset, text after a column list)."""

    status, code = 400, "PGRST100"


class NotImplementedFeature(ApiError):
    """Part of PostgREST's grammar that gatehouse does not serve (spread embeds)."""

    status, code = 400, "PGRST127"


class NotEmbedded(ApiError):
    """A filter, order or limit names an embed the ``select`` does not have."""

    status, code = 400, "PGRST108"


class RelatedOrderNotToOne(ApiError):
    """``order=rel(col)`` on a to-many embed."""

    status, code = 400, "PGRST118"


class InvalidEmbedFilter(ApiError):
    """An embed used as a filter takes only ``is.null`` or ``not.is.null``."""

    status, code = 400, "PGRST120"


class InvalidPreferences(ApiError):
    """An unknown ``Prefer`` value together with ``handling=strict``."""

    status, code = 400, "PGRST122"


@abstract
class RefusedRequest(ApiError):
    """gatehouse's own 400 (``GH400``): a request that PostgREST would answer by guessing, or PostgreSQL would
    fail with its own text, refused before any database work with a message that says what to send instead.
    Each condition is a subclass."""

    status, code = 400, "GH400"


class InvalidUrlEncoding(RefusedRequest):
    """The URL (path or query string) is not UTF-8 once percent-decoded: refused rather than guessed."""


class InvalidConsistencyToken(RefusedRequest):
    """A ``Gatehouse-Consistency`` header that is not what a write's answer gave."""


class ApiKeyInUrl(RefusedRequest):
    """``?apikey=``: URLs end up in logs and browser history."""


class JsonPathOnNonJsonColumn(RefusedRequest):
    """``col->key`` where ``col`` is neither json nor jsonb (PostgreSQL would fail with its own text)."""


class DuplicateOutputName(RefusedRequest):
    """Two outputs of one level of ``select`` have the same name: the JSON object would hold one key twice."""


class AmbiguousRange(RefusedRequest):
    """A ``Range: items=...`` header that is not ``first-[last]`` in non-negative whole numbers."""


class UnfilteredWrite(RefusedRequest):
    """``PATCH`` or ``DELETE`` without a filter, on a contract that does not allow unfiltered writes."""


class InvalidEventPosition(RefusedRequest):
    """``GET /events/<contract>?after=`` with something that is not a position the feed gave (``Gatehouse-Next``)
    or ``now``."""


class InvalidFeedParameter(RefusedRequest):
    """A query parameter of the events feed that it does not take, given twice, or out of its range."""


class NotComposable(RefusedRequest):
    """An embed into another database where no query can stand in for the JOIN it would need: ordering the parent
    by one of its columns, a write's ``return=representation``, a logic function's read (``query/compose.py``
    composes the reads of the data port), or an app whose reads are ``replica_only`` (composed reads use the
    primaries)."""


class CompositionTooDeep(RefusedRequest):
    """More embeds across databases, one inside another, than a read composes (``query/compose.py``)."""


class CompositionTooWide(RefusedRequest):
    """An embed across databases would send more keys than a read may: the page's, or an ``!inner``'s."""


# --- 400/404: names of contracts, columns, relations and functions (the schema cache) ---------------


class UnknownContract(ApiError):
    """No such contract in this version, or the calling app may not see it: the two look the same (PostgREST's
    "table not found"; its hint is chosen among what the app may see, ``suggestions.py``)."""

    status, code = 404, "PGRST205"


class UnknownColumn(ApiError):
    """A write names a column the contract does not have."""

    status, code = 400, "PGRST204"


class UndefinedColumn(ApiError):
    """A read names a column the contract does not have (PostgREST passes on PostgreSQL's 42703)."""

    status, code = 400, "42703"


class RelationshipNotFound(ApiError):
    """No relation the calling app may see fits an embed (one to a contract it may not read does not exist for
    it). PostgREST's words; the hint, when there is one, suggests a close name among the relations it may see."""

    status, code = 400, "PGRST200"


class AmbiguousRelationship(ApiError):
    """More than one relation fits an embed: PostgREST answers 300 (Multiple Choices), and so do we. As in
    PostgREST, ``details`` is a list: one object per candidate (``cardinality``, ``embedding``,
    ``relationship``), so a client can pick one and name it with ``!hint``."""

    status, code = 300, "PGRST201"

    def __init__(self, message: str, *, candidates: Iterable[dict[str, str]] = (), hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.candidates = [dict(candidate) for candidate in candidates]

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.candidates, "hint": self.hint}


class FunctionNotFound(ApiError):
    """No such logic function, or the calling app may not call it, or none that takes these argument names: the
    first two look the same (PostgREST's words and hints, ``suggestions.py``)."""

    status, code = 404, "PGRST202"


class InvalidPath(ApiError):
    status, code = 404, "PGRST125"


# --- 406/410/416: versions and negotiation ---------------------------------------------------------


class UnknownProfile(ApiError):
    """The requested API version (schema profile) is not served."""

    status, code = 406, "PGRST106"


class VersionRetired(ApiError):
    status, code = 410, "GH410"


class NotAcceptable(ApiError):
    status, code = 406, "PGRST107"


class SingularResultRequired(ApiError):
    """``Accept: application/vnd.pgrst.object+json`` and the result is not exactly one row."""

    status, code = 406, "PGRST116"


class RangeNotSatisfiable(ApiError):
    status, code = 416, "PGRST103"


# --- 405: a method the resource does not take; each answer carries ``Allow`` -------------------------


@abstract
class NotAllowed(ApiError):
    """405 (RFC 9110 §15.5.6): the answer names the methods the resource does take, in ``Allow``."""

    status = 405

    def __init__(self, message: str, *, allow: Iterable[str], details: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, details=details, hint=hint, headers={"Allow": ", ".join(allow)})


class MethodNotAllowed(NotAllowed):
    code = "PGRST117"


class RpcMethodNotAllowed(NotAllowed):
    """A method ``/rpc/<name>`` does not take (``PUT``, ``PATCH``, ``DELETE``), or ``GET`` on a logic function
    that writes."""

    code = "PGRST101"


class PutFilterNotKey(NotAllowed):
    """``PUT`` whose filters are not exactly ``eq`` on every key column."""

    code = "PGRST105"


class ContractNotWritable(NotAllowed):
    """The contract's view cannot take this kind of write (joins, grouping)."""

    code = "GH405"


# --- 400/413/415: request bodies, and the writes they ask for ----------------------------------------


class InvalidBody(ApiError):
    """``PGRST102``: a body that cannot be read as rows or arguments (not JSON, an unknown media type, keys that
    differ between rows, too deep). Its subclasses are the conditions with a name of their own."""

    status, code = 400, "PGRST102"


class InvalidArguments(InvalidBody):
    """A logic function's arguments do not validate against its parameters."""


class UnsupportedCharset(ApiError):
    """A body declared in a character set other than UTF-8: refused rather than decoded by guess."""

    status, code = 415, "GH415"


class PayloadTooLarge(ApiError):
    """``GH413``: the body is over ``[server] max_body_bytes``."""

    status, code = 413, "GH413"


class TooManyRows(PayloadTooLarge):
    """A bulk body over ``[server] max_body_rows``."""


class ReadOnlyColumn(ApiError):
    """A body writes a column the contract computes or takes from another table."""

    status, code = 400, "0A000"


class PutWithPaging(ApiError):
    status, code = 400, "PGRST114"


class PutKeyMismatch(ApiError):
    """The body of a ``PUT`` names another row than its URL."""

    status, code = 400, "PGRST115"


class MaxAffectedExceeded(ApiError):
    """``Prefer: handling=strict, max-affected=N`` and the write touched more rows: nothing is kept."""

    status, code = 400, "PGRST124"


# --- 4xx/5xx: the wire (checked before any endpoint; server/rsgi.py, http/exchange.py) ---------------


class UrlTooLong(ApiError):
    status, code = 414, "GH414"


class UnsupportedTransferCoding(ApiError):
    """A transfer coding other than ``chunked`` (RFC 9112 §6.1)."""

    status, code = 501, "GH501"


class BodyTimeout(ApiError):
    """The body did not arrive whole within ``[server] body_timeout_s``."""

    status, code = 408, "GH408"


# --- 401/429: who is calling, and how fast ----------------------------------------------------------------------


class Unauthenticated(ApiError):
    """No usable credentials. Raised before any database work. Where PostgREST has the same condition (an empty,
    malformed or forged token) the message is PostgREST's, word for word, and so is ``WWW-Authenticate``."""

    status, code = 401, "PGRST301"

    def __init__(self, message: str, *, details: str | None = None, hint: str | None = None) -> None:
        super().__init__(
            message,
            details=details,
            hint=hint,
            headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{message}"'},
        )


class MissingCredentials(Unauthenticated):
    """No credentials at all: PostgREST's answer when anonymous access is disabled, which it always is here."""

    code = "PGRST302"

    def __init__(self, message: str = "Anonymous access is disabled", *, hint: str | None = None) -> None:
        ApiError.__init__(self, message, hint=hint, headers={"WWW-Authenticate": "Bearer"})


class InvalidClaims(Unauthenticated):
    """The token is authentic but its claims do not let it in (expired, wrong audience, unknown app...)."""

    code = "PGRST303"


@abstract
class TooManyRequests(ApiError):
    """429: the caller must slow down, for as long as ``Retry-After`` says. Each reason is a subclass."""

    status, code = 429, "GH429"


class TooManyFailures(TooManyRequests):
    """This caller or this credential failed authentication too often within the minute (``auth/failures.py``)."""


class RateLimited(TooManyRequests):
    """The app (or its grant on this contract) used up its rate limit (``limits/admission.py``); the answer
    carries the ``RateLimit`` fields and ``Retry-After``."""


class TooManyInFlight(TooManyRequests):
    """The app already has ``quota.max_in_flight`` requests being answered and no slot freed up in time."""


# --- 403: what the calling app may do --------------------------------------------------------------


@abstract
class PermissionDenied(ApiError):
    """``42501``, PostgreSQL's insufficient_privilege, which PostgREST clients know: the app's grant or its row
    filter does not allow what the request asks. Each condition is a subclass."""

    status, code = 403, "42501"


class ActionNotGranted(PermissionDenied):
    """The app may see the contract but its grant lacks the action (insert, update, delete...)."""


class WriteOutsideFilter(PermissionDenied):
    """A write would put rows outside the app's row filter."""


class HiddenRowConflict(PermissionDenied):
    """A merging upsert meets rows outside the app's row filter, which it may not overwrite."""


class FilteredEventsRefused(PermissionDenied):
    """The events feed of a contract on which the app's grant has a row filter: events are not filtered by row,
    so they would show the app rows its filter hides."""


@abstract
class ClaimRefused(ApiError):
    """``GH403``: the caller's token does not fit this app's row filter (a claim it needs is missing, is a list
    or an object, or is not a value of the filtered column's type). As with PostgREST's bad claims, the caller's
    token is the problem, never the query: no column type or SQL is named."""

    status, code = 403, "GH403"


class MissingClaim(ClaimRefused):
    pass


class ClaimNotScalar(ClaimRefused):
    pass


class ClaimDoesNotFit(ClaimRefused):
    """The claim's value is not a value of the type of the column the row filter compares it with."""


# --- logic functions -------------------------------------------------------------------------------


class LogicError(ApiError):
    """Raise it in a logic function to answer the caller with a clear 4xx (default 400); nothing is written.

    Its status is the function author's to choose, per raise: the author knows whether "no such order" is a
    404 or a 409. The code stays ``GH422`` so a client can tell a function's own refusal from gatehouse's."""

    status, code = 400, "GH422"

    def __init__(self, message: str, *, status: int = 400, details: str | None = None,
                 hint: str | None = None) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"a LogicError's status is 4xx or 5xx, not {status}")
        super().__init__(message, details=details, hint=hint)
        self.status = status


class LogicMisuse(LogicError):
    """A logic function used its context wrongly (a write without a filter, a contract of another database,
    ``one()`` that found several rows): a fault of the function, not of its caller."""

    status = 500

    def __init__(self, message: str, *, details: str | None = None) -> None:
        super().__init__(message, status=500, details=details)


# --- sagas (src/gatehouse/sagas/) ------------------------------------------------------------------


class SagaNotFound(ApiError):
    """No saga of that name, no run with that id, or one the calling app may not see: the three look the same."""

    status, code = 404, "GH404"


class IdempotencyKeyReused(ApiError):
    """A saga started again with an ``Idempotency-Key`` the app already used for a different request (another
    saga or another input): refused, never answered with the first request's saga (the IETF Idempotency-Key
    draft's 422). ``GH422`` is taken by a logic function's own refusal, hence ``GH423``."""

    status, code = 422, "GH423"


class InvalidIdempotencyKey(RefusedRequest):
    """An ``Idempotency-Key`` header that is empty, too long or not printable ASCII: refused before any saga
    starts, rather than cut or changed into a key the client never sent."""


class SagaError(GatehouseError):
    """A saga or a step used the engine wrongly; the run stops and the saga is marked failed (needs attention)."""


class SagaNonDeterministic(SagaError):
    """On replay, step *n* is not the step that was recorded as step *n*: the saga function no longer calls its
    steps in the order it did (code changed under a running saga, or it branches on something not recorded)."""


class SagaMisuse(SagaError):
    """A saga function broke a rule of the engine: a step call that was never awaited, a step of another kind."""


# --- 5xx and PostgreSQL's own errors ---------------------------------------------------------------


class DatabaseError(ApiError):
    """An error PostgreSQL raised, as ``db/sqlstate.py`` maps it: the code is its SQLSTATE and the status the
    one PostgREST gives that SQLSTATE, so both are set per instance. The message is always written by gatehouse;
    PostgreSQL's text is added to ``details`` only with the ``debug`` setting on."""

    status, code = 500, "XX000"

    def __init__(self, message: str, *, sqlstate: str, status: int, details: str | None = None,
                 hint: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, details=details, hint=hint, headers=headers)
        self.status, self.code = status, sqlstate


class ServiceUnavailable(ApiError):
    """No connection to the database could be opened (PostgREST's ``PGRST000``)."""

    status, code = 503, "PGRST000"


class ConnectionLost(ServiceUnavailable):
    """The connection died while a statement was on it."""

    code = "PGRST001"


class AuditUnavailable(ServiceUnavailable):
    """The audit trail can take no more records (store down and spool full): the request is refused."""

    code = "GH503"

    def __init__(self) -> None:
        super().__init__("The audit trail is unavailable", hint="Requests resume when it is back; retry shortly.")


class NoFreshReplica(ServiceUnavailable):
    """An app whose reads go to replicas only (``reads.from = "replica_only"``) and no replica is fresh enough,
    reachable and caught up with the caller's last write."""

    code = "GH520"


class PoolTimeout(ApiError):
    status, code = 504, "PGRST003"


class InternalError(ApiError):
    status, code = 500, "GH500"
