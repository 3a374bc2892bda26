"""The three names of pydantic-core the format's checks need, from its compiled module.

``import pydantic_core`` first builds ``pydantic_core.core_schema`` (some 200 TypedDicts,
with typing_extensions, decimal and fractions): 15-20 ms, more than the validation of a
whole repository, which `validate DIR` (a pre-commit hook) waits for at every start. When
nothing imported pydantic-core yet, the compiled module is loaded on its own and the
package is registered lazily (importlib.util.LazyLoader): whoever uses
``pydantic_core`` afterwards (Pydantic, in the daemon or the tests) runs its
``__init__`` then, which takes the same compiled module, so every class is the same
object either way. Any surprise in that loading falls back to the plain import.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["PydanticCustomError", "SchemaValidator", "ValidationError"]

_PACKAGE = "pydantic_core"
_COMPILED = "pydantic_core._pydantic_core"


def _compiled_alone() -> ModuleType:
    import importlib.machinery
    import importlib.util

    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        raise ImportError(_PACKAGE)
    folder = spec.submodule_search_locations[0]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "_pydantic_core" + suffix)
        if os.path.isfile(path):
            break
    else:
        raise ImportError(_COMPILED)
    compiled_spec = importlib.util.spec_from_file_location(_COMPILED, path)
    if compiled_spec is None or compiled_spec.loader is None:
        raise ImportError(_COMPILED)
    compiled = importlib.util.module_from_spec(compiled_spec)
    compiled_spec.loader.exec_module(compiled)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)  # lazy: runs at the first attribute anyone reads
    package._pydantic_core = compiled  # type: ignore[attr-defined]  # kept by LazyLoader
    sys.modules[_COMPILED] = compiled
    sys.modules[_PACKAGE] = package
    return compiled


def _compiled() -> ModuleType:
    found = sys.modules.get(_COMPILED)
    if found is not None:
        return found
    if _PACKAGE not in sys.modules:
        try:
            return _compiled_alone()
        except Exception:  # an unusual installation: the ordinary import below
            sys.modules.pop(_COMPILED, None)
            sys.modules.pop(_PACKAGE, None)
    import pydantic_core._pydantic_core as compiled

    return compiled


if TYPE_CHECKING:
    from pydantic_core import PydanticCustomError, SchemaValidator, ValidationError
else:
    _module = _compiled()
    PydanticCustomError = _module.PydanticCustomError
    SchemaValidator = _module.SchemaValidator
    ValidationError = _module.ValidationError
