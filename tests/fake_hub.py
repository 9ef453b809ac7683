"""A fake Hugging Face hub on loopback: enough of it for `hf_hub_download` and `dataset_info`.

Endpoints, as huggingface_hub requests them for dataset repos:
- `GET /api/datasets/{repo}/revision/{rev}?blobs=True` -> `{"id", "sha", "siblings": [{"rfilename",
  "size", "blobId", "lfs": {"sha256", "size", "pointerSize"}}]}`;
- `HEAD|GET /datasets/{repo}/resolve/{rev}/{path}`: a small file is answered 200 with `ETag` (its
  git blob id), `Content-Length` and `X-Repo-Commit`; an LFS file (`LFS_SUFFIXES`) is answered 302
  to a second server on another port (the "CDN", whose redirect the client does not follow on
  HEAD) with `X-Linked-Etag` (its sha256), `X-Linked-Size` and `X-Repo-Commit`;
- the CDN serves `GET /{repo}/{path}` with `Content-Length` and `Range` (206) support.
Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), which
huggingface_hub turns into its typed errors. `rev` is "main" or the repo's commit, a hash of
its contents (so editing a file makes a new commit).

Faults, per repo path: `("drop", n)` sends the true `Content-Length` but closes the connection
after byte n of the file; `("body", b)` serves bytes `b` (with their own length) in place of
the file while the listing and the HEAD answer still describe the true file.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".bin", ".jsonl", ".model")


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.faults: dict[str, tuple[str, object]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, hub and CDN
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn)) for cdn in (False, True)]
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)

    def commit(self, repo_id: str) -> str:
        files = self.repos[repo_id]
        return hashlib.sha1("".join(f"{p}:{hashlib.sha256(files[p]).hexdigest()};" for p in sorted(files)).encode()).hexdigest()

    def start(self) -> FakeHub:
        for server in self._servers:
            server.block_on_close = False
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def downloads(self) -> list[str]:
        """URL paths whose bytes were requested: GETs of small files (hub) and LFS files (CDN)."""
        return [p for m, p in self.requests if m == "GET" and not p.startswith("/api/")]


def _handler(hub: FakeHub, cdn: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 5

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            if cdn:
                return self._cdn(path, body)
            if m := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/([^/]+)", path):
                return self._api(*m.groups())
            if m := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(*m.groups(), body=body)
            self._reply(404, b"", {"X-Error-Code": "RepoNotFound"})

        def _repo(self, repo_id: str, revision: str) -> dict[str, bytes] | None:
            if repo_id not in hub.repos:
                self._reply(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            elif revision not in ("main", hub.commit(repo_id)):
                self._reply(404, b"", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
            else:
                return hub.repos[repo_id]
            return None

        def _api(self, repo_id: str, revision: str):
            if (files := self._repo(repo_id, revision)) is None:
                return
            siblings = []
            for name, content in sorted(files.items()):
                sibling = {"rfilename": name, "size": len(content), "blobId": git_blob_id(content)}
                if name.endswith(LFS_SUFFIXES):
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(content).hexdigest()}\n"
                    sibling.update(blobId=git_blob_id(pointer.encode()),
                                   lfs={"sha256": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": len(pointer)})
                siblings.append(sibling)
            payload = {"id": repo_id, "sha": hub.commit(repo_id), "private": False, "siblings": siblings}
            self._reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, revision: str, name: str, body: bool):
            if (files := self._repo(repo_id, revision)) is None:
                return
            commit = {"X-Repo-Commit": hub.commit(repo_id)}
            if name not in files:
                return self._reply(404, b"", {**commit, "X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
            content = files[name]
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(content).hexdigest()
                return self._reply(302, b"", {**commit, "Location": f"{hub.cdn_url}/{repo_id}/{name}",
                                              "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(content)),
                                              "ETag": f'"{git_blob_id(content)}"'})
            kind, arg = hub.faults.get(name, ("", None))
            served = arg if kind == "body" and body else content
            self._reply(200, served if body else b"", {**commit, "ETag": f'"{git_blob_id(content)}"',
                                                       "Content-Length": str(len(served))})

        def _cdn(self, path: str, body: bool):
            owner, repo, name = path.lstrip("/").split("/", 2)
            files = hub.repos.get(f"{owner}/{repo}", {})
            if name not in files:
                return self._reply(404, b"", {})
            kind, arg = hub.faults.get(name, ("", None))
            content = arg if kind == "body" else files[name]
            start = 0
            if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                start = int(m.group(1))
            headers = {"Content-Length": str(len(content) - start), "Accept-Ranges": "bytes"}
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            if kind == "drop" and body:
                self._send_head(206 if start else 200, headers)
                self.wfile.write(content[start:max(start, arg)])
                self.wfile.flush()
                self.close_connection = True
                return
            self._reply(206 if start else 200, content[start:] if body else b"", headers, send_body=body)

        def _send_head(self, status: int, headers: dict):
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()

        def _reply(self, status: int, payload: bytes, headers: dict, send_body: bool = True):
            headers = {"Content-Length": str(len(payload)), **headers}
            self._send_head(status, headers)
            if send_body and self.command != "HEAD":
                self.wfile.write(payload)

    return Handler
