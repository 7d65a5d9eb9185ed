"""Where dataset files are looked up, and the error that lists every place tried."""
from __future__ import annotations

import os
from pathlib import Path

from obdprune.data import cifar
from obdprune.data.idx import IDX_FILES, find_idx_file
from obdprune.errors import DataError, UsageError

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "idx", "digits", "cifar10", "folder", "npz")
USER_DATA = {  # datasets that are the user's own files, at the path data_dir names
    "folder": "a folder holding train/<class>/*.png|jpg and test/<class>/*",
    "npz": "an .npz file holding x_train, y_train, x_test, y_test",
}
DEBIAN_DIR = Path("/usr/share/datasets")
ENV_DATA = "OBDPRUNE_DATA"
_DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}


def canonical_name(name: str) -> str:
    """``name`` as one of DATASETS (case and ``_``/``-`` insensitive); UsageError otherwise."""
    key = str(name).strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/obdprune`` or ``~/.cache/obdprune``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "obdprune"


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders to look in, in order.

    An explicit ``data_dir`` is authoritative (it and ``data_dir/<name>``): asking for a folder and
    silently getting data from elsewhere would be worse than an error. Otherwise:
    ``$OBDPRUNE_DATA`` (as-is and ``/<name>``), ``/usr/share/datasets/<name>``, the user cache.
    """
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        dirs = [base] if name == "idx" else [base, base / name]
    else:
        dirs = []
        env = os.environ.get(ENV_DATA)
        if env:
            dirs += [Path(env).expanduser(), Path(env).expanduser() / name]
        dirs += [DEBIAN_DIR / name, user_cache_dir() / name]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _missing(name: str, folder: Path) -> list[str]:
    if name == "cifar10":
        sub = folder / cifar.SUBFOLDER
        if sub.is_dir():
            return [f"{cifar.SUBFOLDER}/{f}" for f in cifar.missing_files(sub)]
        return cifar.missing_files(folder)
    return [f"{stem}[.gz]" for stem in IDX_FILES if find_idx_file(folder, stem) is None]


def _usable(name: str, folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    if name == "cifar10":
        return cifar.batches_folder(folder)
    return folder if all(find_idx_file(folder, stem) for stem in IDX_FILES) else None


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``name``'s files (see :func:`candidate_dirs` for the lookup order).

    ``digits`` is bundled with scikit-learn (its data folder is returned); ``idx`` needs ``data_dir``.
    Raises DataError listing every place tried, what was missing there and how to get the data.
    """
    name = canonical_name(name)
    if name in USER_DATA:
        if data_dir is None:
            raise UsageError(f"dataset {name!r} needs data_dir (--data-dir): {USER_DATA[name]}")
        return Path(data_dir).expanduser()
    if name == "digits":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "data"
    if name == "idx" and data_dir is None:
        raise UsageError("dataset 'idx' needs a data folder (data_dir) holding the four IDX files")
    tried = []
    for folder in candidate_dirs(name, data_dir):
        found = _usable(name, folder)
        if found is not None:
            return found
        if not folder.exists():
            tried.append(f"{folder} (does not exist)")
        elif not folder.is_dir():
            tried.append(f"{folder} (not a folder)")
        else:
            tried.append(f"{folder} (missing {', '.join(_missing(name, folder))})")
    if name == "cifar10":
        need = f"{', '.join(cifar.TRAIN_BATCHES)}, {cifar.TEST_BATCH} (in {cifar.SUBFOLDER}/ or directly)"
    else:
        need = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES)
    how = []
    if name != "idx":
        how.append(
            f"download it with `obdprune data download {name}` or obdprune.data.download_dataset({name!r}) "
            f"(saves to {user_cache_dir() / name})"
        )
        how.append(f"or put the files in a folder and pass it with --data-dir (data_dir=...) or set ${ENV_DATA}")
    else:
        how.append("put the four IDX files (gzipped or not) in that folder")
    if name in _DEBIAN_PACKAGES:
        how.append(f"or on Debian/Ubuntu: apt install {_DEBIAN_PACKAGES[name]}")
    raise DataError(f"{name} data not found; needs {need}. Looked in: {'; '.join(tried)}. To get it: {', '.join(how)}.")
