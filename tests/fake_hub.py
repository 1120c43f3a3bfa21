"""A local stand-in for the Hugging Face Hub's file protocol, for the real `huggingface_hub` client.

It answers what `snapshot_download` (dry run or not) and `hf_hub_download` ask, and nothing more:

- `GET /api/models/<repo>[/revision/<rev>]`: the repo's info (its `sha` is the one commit every file lives at);
- `GET /api/models/<repo>/tree/<rev>[/<dir>]?recursive=..&cursor=..`: the file listing, paginated with a
  `Link: <...>; rel="next"` header every `tree_page_size` entries;
- `HEAD|GET /<repo>/resolve/<rev>/<path>`: a file's metadata (`X-Repo-Commit`, `ETag`, and for LFS-like files
  `X-Linked-Etag` / `X-Linked-Size`) and, for GET, its body, honouring `Range: bytes=N-` with a 206.

No `X-Xet-*` header is ever sent and the tree has no `xetHash`, so the client always downloads over plain HTTP.
Unknown repos are 404 with `X-Error-Code: RepoNotFound`, unknown revisions `RevisionNotFound`, unknown files
`EntryNotFound` (the client turns these into RepositoryNotFoundError, RevisionNotFoundError and
RemoteEntryNotFoundError). Point a client at it with `HF_ENDPOINT=<hub.url>` set before `huggingface_hub` is
imported (it reads the endpoint at import time), in a subprocess.

Note on resuming: huggingface_hub 2.4 downloads each file into a fresh `<etag>.<8 hex>.incomplete` file under
`blobs/` and opens it with "wb", so a download killed midway is started again from byte 0 by the next process (the
old `.incomplete` file is left behind). It sends `Range: bytes=N-` only within one `http_get` call, when the
connection breaks mid-body; `drop_after` makes the server break it on purpose.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

CHUNK = 64 * 1024
"""Bytes sent between two throttle sleeps (and between two checks of `drop_after`)."""

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".npz", ".npy", ".h5", ".onnx", ".msgpack", ".model")
"""Files stored in LFS on the hub (their ETag is the sha256 of the content); others are git blobs (sha1)."""
LFS_MIN_SIZE = 10 * 1024 * 1024
"""The hub also keeps any file this big in LFS, whatever its name."""
REAL_HASH_LIMIT = 64 * 1024 * 1024
"""`add_sized_repo` files up to this size get the true hashes of their zero bytes; bigger ones get stable fakes."""
_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class _File:
    path: str
    size: int
    source: pathlib.Path | None  # None: `size` zero bytes made on the fly
    lfs: bool
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files, as on the hub)
    sha256: str | None  # LFS files only
    pointer_size: int

    @property
    def etag(self) -> str:
        return self.sha256 if self.sha256 is not None else self.blob_id


@dataclass
class _Repo:
    repo_id: str
    sha: str
    files: dict[str, _File]


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


def _make_file(path: str, size: int, source: pathlib.Path | None, sha256: str, blob_sha1: str) -> _File:
    """A file's metadata, given the sha256 and the git blob sha1 of its content."""
    if _is_lfs(path, size):
        pointer = _lfs_pointer(sha256, size)
        return _File(path, size, source, True, _git_blob_sha1(pointer), sha256, len(pointer))
    return _File(path, size, source, False, blob_sha1, None, 0)


def _hash_stream(chunks: Iterator[bytes], size: int) -> tuple[str, str]:
    """(sha256, git blob sha1) of content given in chunks."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)
    for chunk in chunks:
        sha256.update(chunk)
        sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


def _read_chunks(source: pathlib.Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The bytes of `source` from `start` to `end` (exclusive; None: to its end), CHUNK at a time."""
    with source.open("rb") as f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            chunk = f.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


def _zero_chunks(start: int, end: int) -> Iterator[bytes]:
    zeros = bytes(CHUNK)
    while start < end:
        n = min(CHUNK, end - start)
        yield zeros if n == CHUNK else bytes(n)
        start += n


def _canonical(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


class FakeHub:
    """A fake hub on 127.0.0.1 (a free port), serving repos added with `add_repo` / `add_sized_repo`."""

    def __init__(self) -> None:
        self.throttle: dict[str, float] = {}
        """File path (e.g. "model.safetensors") -> seconds to sleep after each 64 KiB of its body sent."""
        self.drop_after: dict[str, int] = {}
        """File path -> close the connection once after sending this many bytes of a GET of its body (the entry is
        then removed): the client's `http_get` retries in-process with `Range: bytes=N-`."""
        self.tree_page_size = 1000
        """Entries per page of the tree listing (the hub's own cap); lower it to exercise the `Link` pagination."""
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        """(method, path with query, headers with Canonical-Case names) of every request, in arrival order."""
        self.url = ""
        self._repos: dict[str, _Repo] = {}
        self._bodies: list[tuple[str, str, str | None]] = []  # (repo_id, file path, Range header or None)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- repos -------------------------------------------------------------------------------------------

    @staticmethod
    def commit_sha(repo_id: str) -> str:
        """The one commit (40 hex chars) every file of `repo_id` is served at."""
        return hashlib.sha1(f"fake-hub commit of {repo_id}".encode()).hexdigest()

    def add_repo(self, repo_id: str, directory: pathlib.Path) -> None:
        """Serve every file under `directory` (recursively) as `repo_id`'s files. Hashes are computed now; bodies
        are read from disk when requested, so the files must not change while served."""
        files: dict[str, _File] = {}
        for source in sorted(p for p in directory.rglob("*") if p.is_file()):
            path = source.relative_to(directory).as_posix()
            size = source.stat().st_size
            sha256, blob_sha1 = _hash_stream(_read_chunks(source), size)
            files[path] = _make_file(path, size, source, sha256, blob_sha1)
        self._add(repo_id, files)

    def add_sized_repo(self, repo_id: str, sizes: dict[str, int]) -> None:
        """A repo whose files are zero bytes of the given sizes, never stored: a body, if asked for, is made on the
        fly. Files up to REAL_HASH_LIMIT get their true hashes; bigger ones get stable fake ones (nothing checks)."""
        files: dict[str, _File] = {}
        for path, size in sorted(sizes.items()):
            if size <= REAL_HASH_LIMIT:
                sha256, blob_sha1 = _hash_stream(_zero_chunks(0, size), size)
            else:
                seed = f"fake-hub zeros {repo_id}/{path} {size}".encode()
                sha256, blob_sha1 = hashlib.sha256(seed).hexdigest(), hashlib.sha1(seed).hexdigest()
            files[path] = _make_file(path, size, None, sha256, blob_sha1)
        self._add(repo_id, files)

    def _add(self, repo_id: str, files: dict[str, _File]) -> None:
        with self._lock:
            self._repos[repo_id] = _Repo(repo_id, self.commit_sha(repo_id), files)

    def etag(self, repo_id: str, path: str) -> str:
        """The ETag the hub gives the file: the name of its blob in the client's cache (`blobs/<etag>`)."""
        return self._repos[repo_id].files[path].etag

    # -- what was asked ------------------------------------------------------------------------------------

    def body_requests(self, repo_id: str) -> list[tuple[str, str | None]]:
        """(file path, Range header or None) of every GET of a file body (`/resolve/`) for `repo_id`, in order."""
        with self._lock:
            return [(path, rng) for rid, path, rng in self._bodies if rid == repo_id]

    def _record(self, method: str, target: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, target, headers))

    def _record_body(self, repo_id: str, path: str, rng: str | None) -> None:
        with self._lock:
            self._bodies.append((repo_id, path, rng))

    # -- life --------------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False  # keep-alive connections must not hold up stop()
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._stopping.clear()
        self._thread = threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- routing ---------------------------------------------------------------------------------------------

    def _find(self, rest: str, sep: str) -> tuple[_Repo, str] | None:
        """The known repo that `rest` starts with (followed by `sep` or the end), and what follows it."""
        with self._lock:
            repos = sorted(self._repos.values(), key=lambda r: -len(r.repo_id))
        for repo in repos:
            if rest == repo.repo_id and sep == "":
                return repo, ""
            if rest.startswith(repo.repo_id + sep) and sep:
                return repo, rest[len(repo.repo_id) + len(sep) :]
        return None

    def _next_link(self, route: str, query: dict[str, list[str]], cursor: int) -> str:
        params = {k: v[-1] for k, v in query.items()}
        params["cursor"] = str(cursor)
        return f'<{self.url}{route}?{urlencode(params)}>; rel="next"'


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    timeout = 60  # an idle keep-alive connection is dropped after this

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    # -- dispatch --------------------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        hub = self.fake_hub
        headers = {_canonical(k): v for k, v in self.headers.items()}
        hub._record(method, self.path, headers)
        split = urlsplit(self.path)
        route, query = split.path, parse_qs(split.query)
        try:
            if route.startswith("/api/models/"):
                self._api(method, route, query)
            elif "/resolve/" in route:
                self._resolve(method, route)
            else:
                self._error(404, None, f"no such route on the fake hub: {route}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _api(self, method: str, route: str, query: dict[str, list[str]]) -> None:
        hub = self.fake_hub
        rest = route[len("/api/models/") :]
        for sep in ("/revision/", "/tree/", ""):
            found = hub._find(rest, sep)
            if found is None:
                continue
            repo, after = found
            if sep == "":
                self._repo_info(method, repo)
                return
            revision, _, sub = after.partition("/")
            if not self._revision_ok(repo, unquote(revision)):
                return
            if sep == "/revision/" and not sub:
                self._repo_info(method, repo)
            elif sep == "/tree/":
                self._tree(method, repo, route, unquote(sub), query)
            else:
                self._error(404, None, f"no such route on the fake hub: {route}")
            return
        self._error(404, "RepoNotFound", "Repository not found")

    def _resolve(self, method: str, route: str) -> None:
        hub = self.fake_hub
        found = hub._find(route.lstrip("/"), "/resolve/")
        if found is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        repo, after = found
        revision, _, quoted_path = after.partition("/")
        path = unquote(quoted_path)
        if method == "GET":
            hub._record_body(repo.repo_id, path, self.headers.get("Range"))
        if not self._revision_ok(repo, unquote(revision)):
            return
        file = repo.files.get(path)
        if file is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on the fake hub", commit=repo.sha)
            return
        self._serve_file(method, repo, file)

    def _revision_ok(self, repo: _Repo, revision: str) -> bool:
        if revision in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    # -- answers ----------------------------------------------------------------------------------------------

    def _repo_info(self, method: str, repo: _Repo) -> None:
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info = {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": author,
            "sha": repo.sha,
            "lastModified": _LAST_MODIFIED,
            "createdAt": _LAST_MODIFIED,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "mlx",
            "siblings": [{"rfilename": path} for path in repo.files],
        }
        self._json(method, info)

    def _tree(self, method: str, repo: _Repo, route: str, base: str, query: dict[str, list[str]]) -> None:
        recursive = query.get("recursive", ["false"])[-1].lower() == "true"
        base = base.strip("/")
        prefix = base + "/" if base else ""
        if base and base in repo.files:
            self._error(400, None, f"{base} is a file, not a directory")
            return
        entries: dict[str, dict[str, object]] = {}
        for file in repo.files.values():
            if not file.path.startswith(prefix):
                continue
            parts = file.path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # the directories on the way
                directory = prefix + "/".join(parts[:i])
                oid = hashlib.sha1(f"tree {repo.repo_id}/{directory}".encode()).hexdigest()
                entries.setdefault(directory, {"type": "directory", "oid": oid, "size": 0, "path": directory})
            if recursive or len(parts) == 1:
                entries[file.path] = self._tree_file(file)
        if base and not entries:
            self._error(404, "EntryNotFound", f"{base} does not exist on the fake hub", commit=repo.sha)
            return
        listing = [entries[path] for path in sorted(entries)]
        try:
            cursor = int(query.get("cursor", ["0"])[-1])
        except ValueError:
            cursor = 0
        size = max(1, self.fake_hub.tree_page_size)
        page = listing[cursor : cursor + size]
        extra: dict[str, str] = {}
        if cursor + size < len(listing):
            extra["Link"] = self.fake_hub._next_link(route, query, cursor + size)
        self._json(method, page, extra)

    @staticmethod
    def _tree_file(file: _File) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "oid": file.blob_id, "size": file.size, "path": file.path}
        if file.lfs:
            entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": file.pointer_size}
        return entry

    def _serve_file(self, method: str, repo: _Repo, file: _File) -> None:
        hub = self.fake_hub
        start, end = 0, file.size  # end exclusive
        status = 200
        rng = self.headers.get("Range")
        if rng is not None:
            parsed = _parse_range(rng, file.size)
            if parsed is None:
                unsatisfiable = {"Content-Range": f"bytes */{file.size}"}
                self._error(416, None, f"cannot serve {rng} of {file.size} bytes", extra=unsatisfiable)
                return
            (start, end), status = parsed, 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{file.etag}"')
        self.send_header("X-Repo-Commit", repo.sha)
        if file.lfs:
            self.send_header("X-Linked-Etag", f'"{file.etag}"')
            self.send_header("X-Linked-Size", str(file.size))
        name = file.path.rsplit("/", 1)[-1]
        plain = name.encode("ascii", "replace").decode().replace('"', "_")
        self.send_header("Content-Disposition", f"inline; filename*=UTF-8''{quote(name)}; filename=\"{plain}\";")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{file.size}")
        self.end_headers()
        if method == "HEAD":
            return
        chunks = _zero_chunks(start, end) if file.source is None else _read_chunks(file.source, start, end)
        with hub._lock:
            drop = hub.drop_after.pop(file.path, None)
        sent = 0
        for chunk in chunks:
            if hub._stopping.is_set():
                self.close_connection = True
                return
            if drop is not None and sent + len(chunk) >= drop:
                self.wfile.write(chunk[: max(0, drop - sent)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(chunk)
            sent += len(chunk)
            delay = hub.throttle.get(file.path, 0.0)
            if delay > 0:
                self.wfile.flush()
                time.sleep(delay)
        self.wfile.flush()

    def _json(self, method: str, payload: object, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        commit: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single `bytes=` range, or None if it cannot be served."""
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        return (max(0, size - suffix), size) if suffix > 0 and size > 0 else None
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    if start >= size or start >= end:
        return None
    return start, end
