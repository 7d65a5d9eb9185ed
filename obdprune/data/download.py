"""Download Fashion-MNIST, MNIST and CIFAR-10 from their official mirrors, checksum-verified.

Each file is streamed to a temp file in the destination folder, its MD5 checked, then renamed into
place (obdprune.atomic.atomic_write); a failed or mismatching download leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from obdprune.atomic import atomic_write
from obdprune.data import cifar
from obdprune.data.locate import canonical_name, user_cache_dir
from obdprune.errors import DataError, UsageError

ENV_MIRROR = "OBDPRUNE_MIRROR"
_TIMEOUT_S = 60
_CHUNK = 1 << 20

# mirrors (tried in order) and file name → MD5 of the published file.
SOURCES: dict[str, dict] = {
    # Checksums as published in zalandoresearch/fashion-mnist (README) and used by torchvision's
    # torchvision/datasets/mnist.py (FashionMNIST.resources).
    "fashion-mnist": {
        "mirrors": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        "files": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
    # Mirrors and checksums from torchvision's torchvision/datasets/mnist.py (MNIST.mirrors/resources).
    "mnist": {
        "mirrors": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        "files": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    # https://www.cs.toronto.edu/~kriz/cifar.html publishes this MD5 for the python version.
    "cifar10": {
        "mirrors": ("https://www.cs.toronto.edu/~kriz/",),
        "files": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    },
}


def file_md5(path: Path) -> str:
    """Hex MD5 of a file, streamed."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _mirrors(name: str, base_url: str | None) -> list[str]:
    override = base_url or os.environ.get(ENV_MIRROR)
    urls = [override] if override else list(SOURCES[name]["mirrors"])
    for url in urls:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise UsageError(f"mirror URL must be http:// or https://, got {url!r}")
    return [u if u.endswith("/") else u + "/" for u in urls]


def _download(url: str, target: Path, expected_md5: str, progress: bool) -> None:
    """Stream ``url`` into ``target`` atomically; DataError on HTTP/network error or bad checksum."""
    opener = urllib.request.build_opener()  # honours *_proxy / no_proxy as they are now

    def write(tmp: Path) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with opener.open(url, timeout=_TIMEOUT_S) as resp, tmp.open("wb") as out:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
                          disable=not progress, leave=False) as bar:  # fmt: skip
                    while chunk := resp.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as e:
            raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise DataError(f"{url}: download failed ({e.reason})") from None
        except (OSError, http.client.HTTPException) as e:
            raise DataError(f"{url}: download failed ({type(e).__name__}: {e})") from None
        actual = digest.hexdigest()
        if actual != expected_md5:
            raise DataError(f"{url}: checksum mismatch: expected MD5 {expected_md5}, got {actual}; download discarded")

    atomic_write(target, write)


def _fetch(name: str, filename: str, mirrors: list[str], dest: Path, progress: bool) -> Path:
    target = dest / filename
    expected = SOURCES[name]["files"][filename]
    if target.is_file() and file_md5(target) == expected:
        return target
    errors = []
    for mirror in mirrors:
        try:
            _download(mirror + filename, target, expected, progress)
            return target
        except DataError as e:
            errors.append(str(e))
    if len(errors) == 1:
        raise DataError(errors[0])
    raise DataError(f"could not download {filename} from any mirror: {'; '.join(errors)}")


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name:
        raise DataError(f"{archive}: refusing unsafe path {member.name!r} in archive")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refusing {member.name!r}: only plain files and folders are allowed")
    if not path.parts or path.parts[0] != cifar.SUBFOLDER:
        raise DataError(f"{archive}: unexpected member {member.name!r} (expected {cifar.SUBFOLDER}/...)")


def extract_cifar(archive: Path, dest: Path) -> Path:
    """Safely extract ``cifar-10-python.tar.gz`` into ``dest`` → ``dest/cifar-10-batches-py``.

    Every member must be a plain file or folder under ``cifar-10-batches-py/`` (no absolute paths,
    ``..`` or links). Extraction goes to a temp folder first, so a bad archive leaves nothing behind.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tf:
                members = tf.getmembers()
                for member in members:
                    _check_member(archive, member)
                tf.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"{archive}: corrupt or unreadable archive ({e})") from None
        if cifar.batches_folder(tmp / cifar.SUBFOLDER) is None:
            missing = ", ".join(cifar.missing_files(tmp / cifar.SUBFOLDER))
            raise DataError(f"{archive}: archive lacks {cifar.SUBFOLDER}/{{{missing}}}")
        final = dest / cifar.SUBFOLDER
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp / cifar.SUBFOLDER, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_dataset(
    name: str, dest: Path | None = None, *, base_url: str | None = None, progress: bool = True
) -> Path:
    """Download ``name`` (fashion-mnist, mnist or cifar10) into ``dest`` and return ``dest``.

    ``dest`` defaults to the user cache (``~/.cache/obdprune/<name>``), where load_dataset looks.
    ``base_url`` (else ``$OBDPRUNE_MIRROR``) replaces the official mirrors. Files already present
    with the right checksum are kept. DataError names the URL on HTTP errors or checksum mismatch.
    """
    name = canonical_name(name)
    if name not in SOURCES:
        why = "it is bundled with scikit-learn" if name == "digits" else f"bring your own {name} files"
        raise UsageError(f"dataset {name!r} has nothing to download ({why}); downloadable: {', '.join(SOURCES)}")
    dest = Path(dest).expanduser() if dest is not None else user_cache_dir() / name
    mirrors = _mirrors(name, base_url)
    dest.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        if cifar.batches_folder(dest / cifar.SUBFOLDER) is None:
            (archive_name,) = SOURCES[name]["files"]
            archive = _fetch(name, archive_name, mirrors, dest, progress)
            extract_cifar(archive, dest)
            archive.unlink()
        return dest
    for filename in SOURCES[name]["files"]:
        _fetch(name, filename, mirrors, dest, progress)
    return dest
