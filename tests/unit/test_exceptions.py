"""The exception tree drawn in gateway/exceptions.py's docstring is the real one."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import gateway
from gateway import exceptions
from gateway.exceptions import GatewayError


def _drawn_tree() -> dict[str, str | None]:
    """Each class named in the docstring's tree, with the class it hangs under."""
    doc = exceptions.__doc__ or ""
    block = doc.split("::", 1)[1].split("\n\n", 2)[1]
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        body = line[4:]  # the literal block's indent
        match = re.match(r"(?P<lead>(?:│   |    )*)(?:[├└]── )?(?P<name>[A-Z]\w+)\b", body)
        if match is None:
            continue  # a continuation line of a description
        depth = len(match["lead"]) // 4 + (1 if body[len(match["lead"]) :].startswith(("├", "└")) else 0)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[match["name"]] = stack[-1][1] if stack else None
        stack.append((depth, match["name"]))
    return parents


def _real_tree() -> dict[str, str | None]:
    """Every GatewayError subclass the gateway package defines, with its base."""
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        importlib.import_module(info.name)
    found: dict[str, str | None] = {"GatewayError": None}
    todo = [GatewayError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("gateway."):
                found[sub.__name__] = cls.__name__
                todo.append(sub)
    return found


def test_the_docstring_tree_lists_every_exception_of_the_module() -> None:
    drawn = _drawn_tree()
    defined = {
        name
        for name, obj in vars(exceptions).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == exceptions.__name__
    }
    assert defined <= set(drawn), f"missing from the docstring: {sorted(defined - set(drawn))}"


def test_the_docstring_tree_is_the_class_tree() -> None:
    assert _drawn_tree() == _real_tree()
