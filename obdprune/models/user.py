"""The user's own architecture, named as ``FILE.py:FACTORY`` or ``package.module:FACTORY``.

This runs the user's code, exactly like running a script: only name files and modules you trust.
A run made from such a model records the spec with the absolute path and the SHA-256 of the file it
ran; reloading the run checks the file against that hash before running it again, so a run never
silently gets a different architecture.

``FACTORY`` must be defined in that file (a function or an ``nn.Module`` class), so the hash covers it.
It is called with ``input_shape=(C, H, W)`` and ``num_classes=K`` when its signature takes
these keywords (or ``**kwargs``), with only the ones it takes otherwise, and must return an
``nn.Module``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from obdprune.errors import ModelFileError, UsageError

__all__ = ["UserModel", "is_user_spec", "resolve_user_model", "build_user_model", "rebuild_user_model"]

FACTORY_KEYWORDS = ("input_shape", "num_classes")
FORMS = "FILE.py:FACTORY or package.module:FACTORY"


@dataclass(frozen=True)
class UserModel:
    """A resolved user model spec: ``spec`` is what manifests record as the model's name.

    ``file`` is the absolute path of the Python file that defines the factory (for
    ``package.module:FACTORY``, the module's file) and ``sha256`` the hash of its bytes.
    """

    spec: str
    file: Path
    sha256: str
    module: str | None  # dotted module name, or None for a file given by path
    factory: str


def is_user_spec(name: str) -> bool:
    """True for ``FILE.py:FACTORY`` / ``package.module:FACTORY`` (anything with a colon), not for built-in names."""
    return isinstance(name, str) and ":" in name


def _split(spec: str) -> tuple[str, str]:
    source, sep, factory = spec.rpartition(":")
    if not sep or not source or not factory.isidentifier():
        raise UsageError(f"model {spec!r} is not of the form {FORMS}")
    return source, factory


def _is_file_form(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path, spec: str, error: type[Exception]) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"model {spec!r}: {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"model {spec!r}: {path} is a folder, not a Python file") from None
    except OSError as e:
        raise error(f"model {spec!r}: cannot read {path} ({e.strerror})") from None


def _module_file(module: str, spec: str, error: type[Exception]) -> Path:
    """The file of ``module``, found without running the module itself (its parent packages do run)."""
    try:
        found = importlib.util.find_spec(module)
    except Exception as e:  # noqa: BLE001 - a parent package's own code failed; report it in one line
        raise error(f"model {spec!r}: cannot import {module} ({type(e).__name__}: {_first_line(e)})") from None
    if found is None:
        raise error(f"model {spec!r}: no module named {module!r} on the Python path; for a file give FILE.py:FACTORY")
    if not found.origin or not found.has_location or not found.origin.endswith(".py"):
        raise error(f"model {spec!r}: module {module!r} is not a Python source file, so its code cannot be hashed")
    return Path(found.origin).resolve()


def resolve_user_model(spec: str, *, error: type[Exception] = UsageError) -> UserModel:
    """Resolve ``spec`` to an absolute, hashed :class:`UserModel` without running the factory's module.

    >>> m = resolve_user_model("tests/nets/tiny.py:make")  # doctest: +SKIP
    >>> m.spec, m.file.is_absolute()
    ('/abs/path/tests/nets/tiny.py:make', True)
    """
    source, factory = _split(spec)
    if _is_file_form(source):
        if not source.endswith(".py"):
            raise error(f"model {spec!r}: {source} is not a .py file; give {FORMS}")
        path = Path(source).expanduser().resolve()
        return UserModel(f"{path}:{factory}", path, _sha256(_read(path, spec, error)), None, factory)
    path = _module_file(source, spec, error)
    return UserModel(f"{source}:{factory}", path, _sha256(_read(path, spec, error)), source, factory)


_LOADED: dict[tuple[str, str], types.ModuleType] = {}  # (file, sha256) → module executed from exactly those bytes


def _load_module(user: UserModel, error: type[Exception]) -> types.ModuleType:
    """Run the code of ``user.file`` whose bytes hash to ``user.sha256``; refuse if the file now differs."""
    key = (str(user.file), user.sha256)
    if key in _LOADED:
        return _LOADED[key]
    code = _read(user.file, user.spec, error)
    if _sha256(code) != user.sha256:
        raise error(f"model {user.spec!r}: {user.file} changed since its SHA-256 was recorded")
    if user.module is not None:
        module = _import(user, error)
    else:
        name = f"obdprune_user_model_{user.sha256[:16]}"
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, user.file))
        sys.modules[name] = module  # dataclasses and typing look a class's module up by name
        folder = str(user.file.parent)
        sys.path.insert(0, folder)  # as when running the file as a script: its sibling modules import
        try:
            exec(compile(code, str(user.file), "exec"), module.__dict__)  # noqa: S102 - trusted code, see above
        except Exception as e:  # noqa: BLE001 - the user's code failed; say so in one line
            sys.modules.pop(name, None)
            raise error(f"model {user.spec!r}: running {user.file} failed ({type(e).__name__}: {_first_line(e)})") from None
        finally:
            sys.path.remove(folder)
    _LOADED[key] = module
    return module


def _import(user: UserModel, error: type[Exception]) -> types.ModuleType:
    """Import ``user.module`` through the import system (relative imports inside a package work)."""
    try:
        module = importlib.import_module(user.module)
    except Exception as e:  # noqa: BLE001 - the user's code failed; say so in one line
        raise error(f"model {user.spec!r}: importing {user.module} failed ({type(e).__name__}: {_first_line(e)})") from None
    if Path(getattr(module, "__file__", "") or "").resolve() != user.file:
        raise error(f"model {user.spec!r}: {user.module} is now imported from {module.__file__}, not {user.file}")
    return module


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _call_factory(fn, user: UserModel, input_shape: tuple[int, int, int], num_classes: int,
                  error: type[Exception]) -> nn.Module:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    values = {"input_shape": tuple(input_shape), "num_classes": int(num_classes)}
    kwargs = {k: v for k, v in values.items()
              if takes_any or (k in params and params[k].kind is not inspect.Parameter.POSITIONAL_ONLY)}
    try:
        model = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory failed; say so in one line
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise error(f"model {user.spec!r}: {user.factory}({call}) raised {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise error(f"model {user.spec!r}: {user.factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_user_model(user: UserModel, input_shape: tuple[int, int, int], num_classes: int, *,
                     error: type[Exception] = UsageError) -> nn.Module:
    """Run ``user``'s factory for ``input_shape`` = (C, H, W) and ``num_classes``; ``error`` for every failure.

    >>> net = build_user_model(resolve_user_model("mynet.py:make"), (3, 32, 32), 10)  # doctest: +SKIP
    """
    module = _load_module(user, error)
    fn = getattr(module, user.factory, None)
    if fn is None:
        raise error(f"model {user.spec!r}: {user.file} defines no {user.factory!r}")
    if not callable(fn):
        raise error(f"model {user.spec!r}: {user.factory} is a {type(fn).__name__}, not a callable factory")
    if getattr(fn, "__module__", None) != module.__name__:  # else the recorded hash would not cover it
        raise error(f"model {user.spec!r}: {user.factory} is defined in {getattr(fn, '__module__', None)}, not in "
                    f"{user.file}; name the file that defines the factory")
    return _call_factory(fn, user, input_shape, num_classes, error)


def rebuild_user_model(spec: dict) -> nn.Module:
    """Rebuild a user model from a manifest's ``model`` entry (name, file, sha256, input_shape, num_classes).

    Raises ModelFileError with one line if the file is missing or no longer has the recorded SHA-256.
    """
    name, file, digest = spec.get("name"), spec.get("file"), spec.get("sha256")
    if not (isinstance(name, str) and isinstance(file, str) and isinstance(digest, str)):
        raise ModelFileError(f"manifest model {name!r} is user code but does not record its file and sha256")
    source, factory = _split(name) if is_user_spec(name) else ("", "")
    if not factory:
        raise ModelFileError(f"manifest model {name!r} is not of the form {FORMS}")
    path = Path(file)
    if not path.is_absolute():
        raise ModelFileError(f"manifest model {name!r}: recorded file {file!r} is not an absolute path")
    module = None if _is_file_form(source) else source
    user = UserModel(name, path, digest, module, factory)
    if not path.exists():
        raise ModelFileError(f"model {name!r}: {path} no longer exists; the run needs the file it was made with")
    current = _sha256(_read(path, name, ModelFileError))
    if current != digest:
        raise ModelFileError(f"model {name!r}: {path} changed since the run was made (sha256 {current[:12]}…, "
                             f"recorded {digest[:12]}…); restore that file or make the run again")
    shape = tuple(int(s) for s in spec["input_shape"])
    return build_user_model(user, shape, int(spec["num_classes"]), error=ModelFileError)  # type: ignore[arg-type]
