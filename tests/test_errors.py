"""The error tree (src/gatehouse/errors.py): one class per condition, each with its status and code, so the two
cannot drift apart; the rules its docstring states are checked here by walking every class gatehouse defines."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any

import pytest

import gatehouse
from gatehouse import errors
from gatehouse.errors import (
    ABSTRACT,
    AmbiguousRelationship,
    ApiError,
    DatabaseError,
    LogicError,
    LogicMisuse,
)

SRC = Path(gatehouse.__file__).parent
STATUS_PER_INSTANCE = (DatabaseError, LogicError)
"""The classes whose status is chosen at the raise, each saying why in its docstring."""
OUTSIDE_4XX_5XX = {AmbiguousRelationship: 300}
"""PostgREST's own answer to an ambiguous embed is 300 Multiple Choices; clients treat it as the error it is."""
CODE = re.compile(r"^(PGRST[0-9]{3}|GH[0-9]{3}|[0-9A-Z]{5})$")


def _every_module() -> None:
    """Import every module of gatehouse, so that every ApiError subclass anywhere is known to the tree."""
    for module in pkgutil.walk_packages(gatehouse.__path__, "gatehouse."):
        if module.name != "gatehouse.__main__":  # it runs the CLI
            importlib.import_module(module.name)


def _tree() -> list[type[ApiError]]:
    _every_module()
    found: list[type[ApiError]] = []
    stack = [ApiError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(c for c in cls.__subclasses__() if c.__module__.startswith("gatehouse"))
    return found


TREE = _tree()
CONCRETE = [cls for cls in TREE if cls not in ABSTRACT]


def test_every_error_class_lives_in_the_tree_module() -> None:
    strays = [f"{cls.__module__}.{cls.__qualname__}" for cls in TREE if cls.__module__ != "gatehouse.errors"]
    assert not strays, f"define these in gatehouse/errors.py (re-export them where they are used): {strays}"


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda cls: cls.__name__)
def test_every_concrete_class_has_a_status_and_a_code(cls: type[ApiError]) -> None:
    assert isinstance(cls.code, str) and CODE.match(cls.code), cls.code
    low, high = (OUTSIDE_4XX_5XX[cls],) * 2 if cls in OUTSIDE_4XX_5XX else (400, 599)
    assert isinstance(cls.status, int) and low <= cls.status <= high, cls.status


def _declaring_class(cls: type[ApiError]) -> type[ApiError]:
    """The class in ``cls``'s ancestry whose own body sets the code ``cls`` has."""
    return next(base for base in cls.__mro__ if "code" in vars(base))


def test_a_code_is_declared_once_and_shared_only_by_its_subclasses() -> None:
    """Rule: no two classes declare the same code. Conditions that share a PostgREST code (PGRST102 for every body
    it cannot read, 42501 for every refusal of the grant or row filter) are subclasses of the one class that
    declares it, whose docstring says what they share; they keep its status unless the status is per instance."""
    declared: dict[str, type[ApiError]] = {}
    for cls in TREE:
        if "code" in vars(cls):
            assert cls.code not in declared, f"{cls.__name__} and {declared[cls.code].__name__} both declare {cls.code}"
            declared[cls.code] = cls
    for cls in CONCRETE:
        root = _declaring_class(cls)
        assert declared[cls.code] is root
        if root is not cls:
            assert root.__doc__, f"{root.__name__} is shared by {cls.__name__}: say what they have in common"
            if not issubclass(cls, STATUS_PER_INSTANCE):
                assert cls.status == root.status, (cls.__name__, cls.status, root.__name__, root.status)


def _make(cls: type[ApiError], **extra: Any) -> ApiError:
    """An instance, with whatever its constructor requires besides a message."""
    required = {"allow": ("GET",), "sqlstate": "22P02", "status": 400}
    parameters = inspect.signature(cls.__init__).parameters
    kwargs = {name: value for name, value in required.items()
              if name in parameters and parameters[name].default is inspect.Parameter.empty}
    positional = [] if "message" not in parameters else ["something went wrong"]
    make: Any = cls
    made: ApiError = make(*positional, **kwargs, **extra)
    return made


@pytest.mark.parametrize("cls", CONCRETE, ids=lambda cls: cls.__name__)
def test_raising_takes_no_status_or_code(cls: type[ApiError]) -> None:
    made = _make(cls)
    assert set(made.body()) == {"code", "message", "details", "hint"}
    if cls is not DatabaseError:
        assert (made.status, made.code) == (cls.status, cls.code)
    for override in ({"code": "BOGUS"}, {"status": 418}):
        if issubclass(cls, STATUS_PER_INSTANCE) and "status" in override:
            continue
        with pytest.raises(TypeError):
            _make(cls, **override)


@pytest.mark.parametrize("cls", [cls for cls in TREE if cls in ABSTRACT], ids=lambda cls: cls.__name__)
def test_an_abstract_class_is_not_raised_itself(cls: type[ApiError]) -> None:
    with pytest.raises(TypeError):
        _make(cls)


def test_the_classes_with_a_status_per_instance() -> None:
    assert (LogicError("no such order", status=404).status, LogicError("x").status) == (404, 400)
    assert LogicError("no such order", status=404).code == "GH422"
    with pytest.raises(ValueError, match="4xx or 5xx"):
        LogicError("fine", status=200)
    assert (LogicMisuse("update needs a filter").status, LogicMisuse("x").code) == (500, "GH422")
    error = DatabaseError("A row with the same key already exists", sqlstate="23505", status=409)
    assert (error.status, error.code, ApiError.__subclasses__().count(DatabaseError)) == (409, "23505", 1)


def _keyword_overrides(path: Path, names: set[str]) -> list[str]:
    """Calls in ``path`` that construct an error of the tree with ``code=`` or ``status=``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name not in names:
            continue
        for keyword in node.keywords:
            if keyword.arg == "code" or (keyword.arg == "status" and name not in ("LogicError", "DatabaseError")):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {name}({keyword.arg}=...)")
    return found


def test_no_module_passes_a_status_or_a_code() -> None:
    names = {cls.__name__ for cls in TREE}
    offenders = [hit for path in sorted(SRC.rglob("*.py")) for hit in _keyword_overrides(path, names)]
    assert not offenders, offenders


def test_the_tree_module_lists_every_class_in_its_groups() -> None:
    """Each class is under a group comment (``# --- ...``), so errors.py reads as the list of what clients see."""
    source = Path(errors.__file__).read_text()
    first_group = source.index("\n# --- ")
    for cls in CONCRETE:
        if cls.__module__ == "gatehouse.errors" and cls not in (ApiError,):
            assert source.index(f"\nclass {cls.__name__}(") > first_group, cls.__name__
