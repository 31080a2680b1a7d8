"""Light package faces: a package's public names load their module on first use.

pyllm's one lazy-import mechanism, used by ``pyllm``, ``pyllm.train`` and ``pyllm.bench``. It keeps
``import pyllm`` -- and so ``pyllm --help`` and ``pyllm <command> --help``, which only build argparse
parsers from standard-library modules -- free of torch: ``pyllm.attention`` imports ``pyllm.ops``
(and torch) the first time it is touched, then is an ordinary attribute.

It is Python's documented way to customise module attribute access (a ``types.ModuleType``
subclass assigned to the module's ``__class__``): ``__getattr__`` resolves an exported name, and
``__setattr__`` keeps an exported *function* when the import system later sets a submodule of the
same name on the package (``pyllm.check`` stays the function, as it was when the package imported
everything eagerly).
"""

from __future__ import annotations

import importlib
import sys
import types


class _LazyPackage(types.ModuleType):
    def __getattr__(self, name):
        target = self.__dict__["_lazy_exports"].get(name)
        if target is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        module_name, _, attribute = target.partition(":")
        first = self.__dict__["_lazy_needs"].get(name)
        if first is not None:  # e.g. pyllm.backends is complete only once the ops registered themselves
            importlib.import_module(first)
            if name in self.__dict__:  # importing `first` already set it
                return self.__dict__[name]
        value = importlib.import_module(module_name)
        if attribute:
            value = getattr(value, attribute)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and ":" in self.__dict__["_lazy_exports"].get(name, ""):
            return  # the submodule pyllm.check is imported; the name pyllm.check stays the function
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(self.__dict__) | set(self.__dict__["_lazy_exports"]))


def lazy_exports(package: str, exports: dict[str, str], needs: dict[str, str] | None = None) -> None:
    """Make ``package``'s names ``exports`` (name -> "module" or "module:attribute") load on first use;
    ``needs`` (name -> module) names a module to import before that name's own."""
    module = sys.modules[package]
    module.__dict__["_lazy_exports"] = dict(exports)
    module.__dict__["_lazy_needs"] = dict(needs or {})
    module.__class__ = _LazyPackage
