"""Where shards live: local folders and URLs (`s3://`, `gs://`, `http(s)://`, `file://`,
`pipe:CMD`).

`data.root`, the shard writers' `--out` and vlds.data.prep.extract's `--shards`/`--out` take
a URL wherever they take a folder. Remote files are opened through fsspec (s3fs, gcsfs and
aiohttp: the `remote` extra), so credentials come from each backend's usual environment and
config (AWS_ACCESS_KEY_ID / AWS_PROFILE / ~/.aws and AWS_ENDPOINT_URL_S3 for an S3-compatible
server; GOOGLE_APPLICATION_CREDENTIALS or gcloud's default login), never from vlds' own
config, and every URL vlds logs or puts in an error passes `redact` first (user:password@
and query strings, e.g. presigned signatures, are cut).

`pipe:CMD` is webdataset's convention: CMD's standard output is the file (reading) or CMD's
standard input takes it (writing), with `{}` in CMD standing for the path under the root:
`--data.root='pipe:curl -sf https://host/shards/{}'`. It is accepted from the command line
only; an index file naming a `pipe:` shard is refused (a data file must not run commands).

Written by hand, and only this: the `pipe:` opener (fsspec has none for a command), the
forward-only reading of streams that cannot seek (HTTP is streamed: Python's http.server and
many CDNs answer no range requests; a seek forward reads and drops), bounded retries with
backoff around opening, and the errors that name the URL and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger("vlds")

SCHEMES = ("s3", "gs", "gcs", "http", "https")
EXTRA = "pip install -e '.[remote]' (s3fs, gcsfs, aiohttp)"
TRIES = 4  # attempts at opening a remote file (transient errors only), backoff 0.5, 1, 2 s
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.I)


def is_url(loc) -> bool:
    """A remote location: a URL with a scheme other than file://, or pipe:CMD."""
    s = str(loc)
    return s.startswith("pipe:") or bool(_URL.match(s)) and not s.startswith("file://")


def local_path(loc) -> Path:
    """A local location as a Path (file:///x -> /x)."""
    s = str(loc)
    return Path(s[len("file://") :] if s.startswith("file://") else s).expanduser()


def location(loc):
    """A location as vlds keeps it: a URL string, or a local Path."""
    if loc is None or loc == "":
        return loc
    if not is_url(loc):
        return local_path(loc)
    s = str(loc)
    scheme = s.split(":", 1)[0].lower()
    if scheme != "pipe" and scheme not in SCHEMES:
        raise ValueError(
            f"{redact(s)}: unsupported URL scheme {scheme!r}; use a local folder, file://, "
            f"s3://, gs://, http(s):// or pipe:CMD"
        )
    if scheme == "pipe" and "{}" not in s:
        raise ValueError(
            f"{redact(s)}: a pipe: location needs {{}} where the path under the root goes, "
            f"e.g. pipe:curl -sf https://host/shards/{{}}"
        )
    return s.rstrip("/") if scheme != "pipe" else s


def join(root, *parts: str):
    """root / parts for a folder, a URL or a pipe: template ({} takes the joined path)."""
    root = location(root)
    if isinstance(root, Path):
        return root.joinpath(*parts)
    rel = "/".join(p.strip("/") for p in parts if p)
    if root.startswith("pipe:"):
        return root.replace("{}", rel)
    return f"{root}/{rel}" if rel else root


def _pipe_command(loc: str) -> str:
    if "{}" in loc:
        raise ValueError(f"{redact(loc)}: a pipe: root names a folder; join a path to it")
    return loc[len("pipe:") :]


def redact(s) -> str:
    """`s` with credentials cut from any URL in it: user:password@ and query strings."""
    s = re.sub(r"(://)[^/@\s]+@", r"\1***@", str(s))
    return re.sub(r"(://[^\s?]+)\?[^\s'\"]*", r"\1?***", s)


def cache_dir(loc) -> Path:
    """A local folder for what a remote root needs on disk (its tokenizer, built models),
    named by the URL and, for s3://, the endpoint (the same bucket name on another server is
    other data). Delete it to fetch those again."""
    base = Path(os.environ.get("VLDS_CACHE") or Path.home() / ".cache" / "vlds")
    key = redact(loc)
    if key.startswith("s3://"):
        key += " " + os.environ.get("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL", ""))
    return base / "remote" / hashlib.sha1(key.encode()).hexdigest()[:16]


# ---- errors ----------------------------------------------------------------------------


class RemoteError(OSError):
    """A remote file that cannot be opened or read, with the URL (redacted) and the fix."""


def _backend_errors() -> tuple:
    errs = []
    try:
        import aiohttp

        errs.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import botocore.exceptions as b

        errs += [b.BotoCoreError, b.ClientError]
    except ImportError:
        pass
    return tuple(errs)


# What reading a shard may raise: skipped and counted by the reader (vlds.data.shardio).
READ_ERRORS = (OSError, EOFError, ValueError, TimeoutError) + _backend_errors()


def _hint(url: str) -> str:
    scheme = url.split(":", 1)[0].lower()
    if scheme == "s3":
        return (
            "credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
            "~/.aws/credentials; an S3-compatible server from AWS_ENDPOINT_URL_S3"
        )
    if scheme in ("gs", "gcs"):
        return (
            "credentials from GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth "
            "application-default login`"
        )
    if scheme == "pipe":
        return "run the command by hand to see why it fails"
    return "check the URL and that the server is up"


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "code"):
        v = getattr(exc, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    m = re.search(r"\b(40[0-9]|5[0-9][0-9])\b", str(exc))
    return int(m.group(1)) if m else None


def _kind(exc: BaseException) -> str:
    """'missing', 'denied', 'credentials', 'transient' or 'other'; a wrapped error by its
    cause (fsspec's HTTP reports a refused connection as FileNotFoundError from it)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return "credentials"
    if isinstance(exc, FileNotFoundError) or _status(exc) == 404:
        return "missing"
    if isinstance(exc, PermissionError) or _status(exc) in (401, 403):
        return "denied"
    status = _status(exc)
    if status is not None and (status >= 500 or status == 429):
        return "transient"
    transient = (ConnectionError, TimeoutError, EOFError)
    if isinstance(exc, transient) or re.search(
        r"connect|timed? ?out|reset|refused|unreachable|EndpointConnection", f"{name} {exc}", re.I
    ):
        return "transient"
    return "other"


def describe(url: str, exc: BaseException, what: str = "read") -> RemoteError:
    """A RemoteError for a failed open/read of `url`: what went wrong and the fix."""
    u, kind, hint = redact(url), _kind(exc), _hint(url)
    cause = exc.__cause__ or exc
    why = redact(f"{type(cause).__name__}: {cause}")
    if kind == "credentials":
        msg = f"cannot {what} {u}: no credentials found ({why}); set {hint}"
    elif kind == "missing":
        msg = f"cannot {what} {u}: it does not exist ({why}); check the URL"
    elif kind == "denied":
        msg = f"cannot {what} {u}: access denied ({why}); check the {hint}"
    elif kind == "transient":
        msg = f"cannot {what} {u} after {TRIES} tries ({why}); {hint}"
    else:
        msg = f"cannot {what} {u} ({why}); {hint}"
    err = RemoteError(msg)
    err.kind = kind
    return err


def retried(fn, url: str, what: str = "read", tries: int = TRIES):
    """fn() with up to `tries` attempts on transient errors (backoff 0.5 s, doubling); other
    errors at once. Raises a RemoteError naming the URL and the fix."""
    for attempt in range(tries):
        try:
            return fn()
        except RemoteError:
            raise
        except READ_ERRORS as e:
            if _kind(e) != "transient" or attempt == tries - 1:
                raise describe(url, e, what) from e
            log.warning("%s %s failed (%s); retrying", what, redact(url), type(e).__name__)
            time.sleep(0.5 * 2**attempt)


# ---- opening ---------------------------------------------------------------------------


def _options(url: str) -> dict:
    """Timeouts so that an endpoint that does not answer fails in seconds, not minutes."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "s3":
        # the endpoint botocore would read anyway, passed so that fsspec's cache of open
        # filesystems tells two servers apart
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return ({"endpoint_url": endpoint} if endpoint else {}) | {
            "config_kwargs": {
                "connect_timeout": 5,
                "read_timeout": 60,
                "retries": {"max_attempts": 2, "mode": "standard"},
            },
        }
    if scheme in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=5, sock_read=60)}}
    return {}


def filesystem(url: str):
    """(fsspec filesystem, path) for a URL; names the extra to install when missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **_options(url))
    except ImportError as e:
        raise RemoteError(f"{redact(url)} needs {e.name or e}: {EXTRA}") from e


class _Forward(io.RawIOBase):
    """A forward-only raw stream over a file object that cannot seek (streamed HTTP, a
    command's stdout); io.BufferedReader on top gives it peek()."""

    def __init__(self, f, url: str, proc: subprocess.Popen | None = None):
        self.f, self.url, self.proc, self.eof = f, url, proc, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self.f.read(len(b))
        except READ_ERRORS as e:
            raise describe(self.url, e) from e
        n = len(data)
        b[:n] = data
        if not n and not self.eof:
            self.eof = True
            self._check_exit()
        return n

    def _check_exit(self) -> None:
        if self.proc is None:
            return
        rc = self.proc.wait()
        if rc:
            err = self.proc.stderr.read().decode("utf-8", "replace").strip()[-500:]
            raise RemoteError(
                f"{redact(self.url)}: the command exited with {rc}"
                f"{': ' + redact(err) if err else ''}; {_hint('pipe:')}"
            )

    def close(self) -> None:
        if not self.closed:
            try:
                self.f.close()
            finally:
                if self.proc is not None:
                    if self.proc.poll() is None:
                        self.proc.kill()
                    self.proc.wait()
                    self.proc.stderr.close()
        super().close()


def open_read(loc, buffer: int = 1 << 20):
    """A binary reader with peek() over a local file or a URL. URLs that can seek (s3, gs)
    seek with range requests; streamed ones (http(s), pipe:) are forward-only: their
    `seekable()` is False and the tar reader reads over what it skips."""
    if not is_url(loc):
        return open(local_path(loc), "rb")
    url = str(loc)
    if url.startswith("pipe:"):
        cmd = _pipe_command(url)

        def start():
            p = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            return _Forward(p.stdout, url, p)

        return io.BufferedReader(retried(start, url), buffer)
    fs, path = filesystem(url)
    if url.split(":", 1)[0].lower() in ("http", "https"):
        f = retried(lambda: fs.open(path, "rb", block_size=0), url)
        return io.BufferedReader(_Forward(f, url), buffer)
    f = retried(lambda: fs.open(path, "rb"), url)
    return io.BufferedReader(f, buffer)


def read_bytes(loc) -> bytes:
    """A whole (small) file: an index, a manifest."""
    if not is_url(loc):
        return local_path(loc).read_bytes()
    with open_read(loc) as f:
        return f.read()


def skip(f, n: int) -> None:
    """Move a reader n bytes forward: a seek where it can, else a read that is dropped."""
    if f.seekable():
        f.seek(n, 1)
        return
    while n > 0:
        got = len(f.read(min(n, 1 << 20)))
        if not got:
            raise EOFError("stream ended while skipping")
        n -= got


def fetch_dir(src, dest: Path) -> bool:
    """Copy a folder (local or remote) to `dest` once (whole: into a temp name, then
    renamed); False when there is no such folder. A pipe: location cannot be listed: False."""
    if dest.is_dir():
        return True
    if not is_url(src):
        if not local_path(src).is_dir():
            return False
        shutil.copytree(local_path(src), dest)
        return True
    url = str(src)
    if url.startswith("pipe:"):
        return False
    fs, path = filesystem(url)
    if not retried(lambda: fs.isdir(path), url, "look up"):
        return False
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    try:
        src = path.rstrip("/") + "/"
        retried(lambda: fs.get(src, str(part) + "/", recursive=True), url, "copy")
        part.rename(dest)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return True


def upload(local: Path, url: str) -> None:
    """Copy a local file to a URL (s3/gs: one object, complete or absent; pipe: CMD reads it
    on its standard input)."""
    if url.startswith("pipe:"):
        cmd = _pipe_command(url)
        with open(local, "rb") as f:
            p = subprocess.run(cmd, shell=True, stdin=f, capture_output=True)
        if p.returncode:
            err = p.stderr.decode("utf-8", "replace").strip()[-500:]
            raise RemoteError(f"{redact(url)}: the command exited with {p.returncode}: {err}")
        return
    fs, path = filesystem(url)
    retried(lambda: fs.put_file(str(local), path), url, "write")


# ---- writing -----------------------------------------------------------------------------


def publish(stage: Path, url: str) -> int:
    """Upload a written shard root to a URL: every file under `stage` at the same relative
    path, the split indexes last (training reads only those, so a reader never finds an index
    before its shards). Half-written temp files are left out. Returns the files uploaded."""
    from tqdm import tqdm

    files = sorted(p for p in Path(stage).rglob("*") if p.is_file() and ".tmp" not in p.name)
    files.sort(key=lambda p: p.name.endswith(".index.json"))  # stable: indexes last
    for p in tqdm(files, desc=f"upload to {redact(url)}", unit="file", mininterval=2):
        upload(p, join(url, p.relative_to(stage).as_posix()))
    return len(files)


@contextlib.contextmanager
def staged(out):
    """A local folder to write the shard root `out` into. For a URL: a staging folder in
    the cache (cache_dir), uploaded by `publish` when the writer returns, then removed; a
    writer killed before that resumes from it when run again with the same --out."""
    out = location(out)
    if not is_url(out):
        yield out
        return
    stage = cache_dir(out) / "stage"
    stage.mkdir(parents=True, exist_ok=True)
    log.info("writing into %s, uploaded to %s at the end", stage, redact(out))
    yield stage
    n = publish(stage, out)
    log.info("uploaded %d files to %s", n, redact(out))
    shutil.rmtree(stage)
