"""Entry signatures derived from the options' one definition.

The options of a loss are frozen dataclasses that name, default and check them once
(``InfoNCEOptions`` and ``GistOptions`` in ``fastclip/ops/family_variants.py``, ``Common`` in
``fastclip/ops/inputs.py``). An entry point takes them as ``**options`` and is decorated with
:func:`takes_options`, which writes the fields into its signature (keyword-only, with their defaults and
annotations: what ``help()``, ``inspect.signature`` and IDEs built on it show); at call time
:func:`split_options` turns the keywords into the checked objects. A new option is then a field (and its
check) in its dataclass, and every entry that spells the options out has it.
"""

from __future__ import annotations

import dataclasses
import inspect

_KW = inspect.Parameter.KEYWORD_ONLY
_VAR_KW = inspect.Parameter.VAR_KEYWORD
# Field names per options type, read once at decoration: ``torch.compile`` (Dynamo) traces
# split_options in a compiled training step but not ``dataclasses.fields`` of a class.
_NAMES: dict[type, tuple[str, ...]] = {}


def _names(t) -> tuple[str, ...]:
    if t not in _NAMES:
        _NAMES[t] = tuple(f.name for f in dataclasses.fields(t))
    return _NAMES[t]


def takes_options(*types):
    """Decorator: replace ``fn``'s ``**options`` in its signature by the fields of ``types``."""

    def decorate(fn):
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        if not params or params[-1].kind is not _VAR_KW:
            raise AssertionError(f"{fn.__qualname__}: takes_options needs a final **options parameter")
        own = params[:-1]
        taken = {p.name for p in own}
        added = []
        for t in types:
            _names(t)
            for f in dataclasses.fields(t):
                if f.name in taken or f.default is dataclasses.MISSING:
                    raise AssertionError(f"{fn.__qualname__}: option {f.name!r} clashes or has no default")
                taken.add(f.name)
                added.append(inspect.Parameter(f.name, _KW, default=f.default, annotation=f.type))
        fn.__signature__ = sig.replace(parameters=own + added)
        fn.option_types = types
        return fn

    return decorate


def split_options(entry: str, given: dict, *types) -> tuple:
    """One checked object per type in ``types`` from the keywords ``given`` (each field's default where
    not given). A keyword that no type has raises the ``TypeError`` Python raises for an unexpected
    keyword argument, with the accepted names."""
    owner = {name: t for t in types for name in _names(t)}
    unknown = [k for k in given if k not in owner]
    if unknown:
        raise TypeError(
            f"{entry}() got an unexpected keyword argument {unknown[0]!r} (its options: {', '.join(owner)})"
        )
    return tuple(t(**{k: v for k, v in given.items() if owner[k] is t}) for t in types)
