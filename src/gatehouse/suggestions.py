"""PostgREST's "Perhaps you meant ..." answers for a misspelt contract or function, over what the calling app may
see and nothing else.

A name the app may not use (a contract it holds no grant on, a function not granted to it) is answered exactly
like a name that does not exist (404, no hint), and the candidates a hint is chosen from are only the names the
app could use: a hint never tells an app that something it may not see exists. Everything here runs on the error
path only.

How close is close enough is PostgREST's rule, so clients see the same hints: names are scored as its fuzzyset
library scores them (``query/suggest.py``: n-grams to find candidates, then ``1 - levenshtein / longer length``);
a contract or function is suggested from 0.75 up, a parameter list from 0.33 up. ``difflib``'s ratio was measured
first: on 3,885 random one-to-three-edit typos of 25 typical names it chose the same hint (or none) as PostgREST's
score only 81 % of the time at PostgREST's threshold, and no difflib threshold that keeps PostgREST's own examples
(``projecxx`` → ``projects``) does better. Names longer than :data:`MAX_NAME` get no hint: scoring costs the
product of the lengths, and a 404 must stay cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gatehouse.errors import FunctionNotFound, UnknownContract
from gatehouse.project import App, Project
from gatehouse.query.suggest import ranked

TABLE_SCORE = 0.75
"""PostgREST's minimum score for a table or function hint (``getOneWithMinScore 0.75``)."""
PARAMS_SCORE = 0.33
"""PostgREST's minimum score for a parameter-list hint (fuzzyset's default)."""
MAX_NAME = 128
"""Longer names (or parameter lists) are not scored: no hint."""


def closest(name: str, candidates: Iterable[str], min_score: float = TABLE_SCORE) -> str | None:
    """The candidate most like ``name`` with a score of at least ``min_score``, or None."""
    if not name or len(name) > MAX_NAME:
        return None
    found = ranked(name, [c for c in candidates if c != name and len(c) <= MAX_NAME], min_score)
    return found[0][1] if found else None


def schema_label(project: Project, app: App, version: int) -> str:
    """The "schema" PostgREST's messages name: ``public`` for the version a request without a profile gets (the
    app's own, else the project's default), ``vN`` for any other."""
    return "public" if version == (app.config.version or project.default_version) else f"v{version}"


def visible_contracts(project: Project, app: App, version: int) -> list[str]:
    """The contracts of this version the app holds any grant on: the only names a hint may show it."""
    return [name for name in project.versions.served.get(version, {}) if app.grant_for(name)]


def unknown_contract(project: Project, app: App, version: int, name: str) -> UnknownContract:
    """PGRST205, in PostgREST's words, for a contract that does not exist or that the app may not see."""
    schema = schema_label(project, app, version)
    near = closest(name, visible_contracts(project, app, version))
    return UnknownContract(f"Could not find the table '{schema}.{name}' in the schema cache",
                           hint=None if near is None else f"Perhaps you meant the table '{schema}.{near}'")


def _parameter_list(names: Iterable[str]) -> str:
    return f"({', '.join(sorted(names))})"


def unknown_function(project: Project, app: App, version: int, name: str, arguments: Iterable[str], *,
                     post: bool, parameters: Mapping[str, bool] | None = None) -> FunctionNotFound:
    """PGRST202, in PostgREST's words: no function ``name`` the app may call takes these argument names.

    ``parameters`` (name → required) are those of the app's function of that name when it has one: the hint
    then suggests its parameter list, else a function of a similar name among those granted to the app."""
    schema = schema_label(project, app, version)
    qualified = f"{schema}.{name}"
    given = sorted(set(arguments))
    listed = ", ".join(given)
    called = f"{qualified}({listed})" if given else f"{qualified} without parameters"
    searched = (f" with parameter{'s' if len(given) > 1 else ''} {listed}" if given else " without parameters")
    if post:
        searched += " or with a single unnamed json/jsonb parameter"
    if parameters is not None:
        near = closest(_parameter_list(given), [_parameter_list(parameters)], PARAMS_SCORE)
        suggestion = None if near is None else f"{name}{near}"
    else:
        suggestion = closest(name, [f for f in app.config.functions if f in project.functions])
    return FunctionNotFound(
        f"Could not find the function {called} in the schema cache",
        details=f"Searched for the function {qualified}{searched}, but no matches were found in the schema cache.",
        hint=None if suggestion is None else f"Perhaps you meant to call the function {schema}.{suggestion}")


def arguments_fit(arguments: Iterable[str], parameters: Mapping[str, bool]) -> bool:
    """Whether these argument names call a function with these parameters (name → required), as PostgREST picks
    a function: every argument is a parameter and every required parameter is given."""
    given = set(arguments)
    return given <= set(parameters) and {p for p, required in parameters.items() if required} <= given
