"""HTTP/1.1 in front of the API verbs: bearer-token auth, a routing table, JSON and chunked streams.

Only the routes the pod operator, the ``kubernetes`` clients and Kueue readers (the Kueue objects
and the visibility API, read-only) call are served. Any other path is
a 404 recorded in ``unknown_routes``, so a test can assert that a run needed nothing the emulator
lacks; a known path with another method is a 405, as on the real server.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import traceback
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .api import ApiServer, truthy
from .kueue_schema import API_VERSION, PLURAL_KIND
from .status import ApiError

K8S_VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-trainyard-emulator",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.24",
    "compiler": "gc",
    "platform": "linux/amd64",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "trainyard-k8s-emulator"
    api: ApiServer  # set on the subclass each emulator makes
    token: str

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read requests_log instead
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        store = self.api.store
        self._body_read = False
        split = urlsplit(self.path)
        path = unquote(split.path).rstrip("/") or "/"  # decoded, as Go servers route
        query = {key: values[-1] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        with store.lock:
            store.requests.append((method, self.path))
        try:
            if self.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized")
            route, params = _route(method, path)
            route(self, query, **params)
        except ApiError as exc:
            if exc.code == 404 and exc.details is None:  # no such route, rather than no such object
                with store.lock:
                    store.unknown_routes.append((method, self.path))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._read_rest()
                self.send_json(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a bug in the emulator: answer 500 and make it visible
            traceback.print_exc()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_json(500, ApiError(500, f"emulator error: {exc!r}").status())

    # ------------------------------------------------------------------------------------------ plumbing

    def body(self) -> Any:
        self._body_read = True
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"couldn't get version/kind; json parse error: {exc}") from exc

    def _read_rest(self) -> None:
        """Drain an unread body before answering an error, so the connection stays usable."""
        if not self._body_read:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self._body_read = True

    def send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def send_stream(self, content_type: str, chunks: Iterator[bytes]) -> None:
        """Chunked transfer until the iterator ends; an empty chunk is a heartbeat, not sent."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        # The stream ends the connection: say so, or urllib3 pools it and the next request on it
        # fails with RemoteDisconnected.
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for chunk in chunks:
                if chunk:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.flush()
                elif self.api.store.stopping.is_set():
                    break
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass


# ---------------------------------------------------------------------------------------------- routes


def _version(h: Handler, query: dict[str, str]) -> None:
    h.send_json(200, K8S_VERSION)


def _list(resource: str) -> Callable[..., None]:
    """A list, or with ``?watch=true`` newline-delimited watch events (from ``resourceVersion`` if given)."""

    def route(h: Handler, query: dict[str, str], namespace: str | None = None, plural: str = "") -> None:
        items, rv, matches = h.api.list(plural or resource, namespace, query)
        if not truthy(query.get("watch")):
            if plural:
                kind, api_version = f"{PLURAL_KIND[plural]}List", API_VERSION
            else:
                kind, api_version = ("PodList" if resource == "pods" else "EventList"), "v1"
            body = {
                "kind": kind,
                "apiVersion": api_version,
                "metadata": {"resourceVersion": rv, **({"continue": ""} if plural else {})},
                "items": items,
            }
            return h.send_json(200, body)
        since = query.get("resourceVersion")
        since_rv = int(since) if since not in (None, "", "0") else None
        initial = [] if since_rv is not None else items
        events = h.api.watch(
            plural or resource, matches, since_rv, initial, float(query.get("timeoutSeconds") or 1800)
        )
        h.send_stream("application/json", (json.dumps(e).encode() + b"\n" if e else b"" for e in events))
        return None

    return route


def _create_pod(h: Handler, query: dict[str, str], namespace: str) -> None:
    body = h.body()
    store = h.api.store
    with store.lock:
        store.received_pods.append(copy.deepcopy(body))
    created = h.api.create_pod(namespace, body)
    with store.lock:
        lose = store.lose_create_responses > 0
        store.lose_create_responses -= lose
    if lose:  # the pod exists; the client is told the server timed out, as an overloaded one does
        message = (
            "the server was unable to return a response in the time allotted, but may still be "
            "processing the request (post pods)"
        )
        raise ApiError(504, message)
    h.send_json(201, created)


def _get_pod(h: Handler, query: dict[str, str], namespace: str, name: str) -> None:
    h.send_json(200, h.api.get_pod(namespace, name))


def _patch_pod(h: Handler, query: dict[str, str], namespace: str, name: str) -> None:
    content_type = (h.headers.get("Content-Type") or "").split(";")[0].strip()
    h.send_json(200, h.api.patch_pod(namespace, name, content_type, h.body()))


def _delete_pod(h: Handler, query: dict[str, str], namespace: str, name: str) -> None:
    grace = (h.body() or {}).get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
    h.send_json(200, h.api.delete_pod(namespace, name, None if grace is None else float(grace)))


def _pod_log(h: Handler, query: dict[str, str], namespace: str, name: str) -> None:
    h.send_stream("text/plain", h.api.log(namespace, name, query))


def _kueue_get(h: Handler, query: dict[str, str], plural: str, name: str, namespace: str = "") -> None:
    with h.api.store.lock:
        obj = h.api.kueue.read(PLURAL_KIND[plural], namespace, name)
    h.send_json(200, obj)


def _pending_workloads(h: Handler, query: dict[str, str], **where: str) -> None:
    with h.api.store.lock:
        summary = h.api.kueue.pending_workloads(
            where.get("cluster_queue"), where.get("namespace"), where.get("local_queue"), query
        )
    h.send_json(200, summary)


_NS = r"/api/v1/namespaces/(?P<namespace>[^/]+)"
_POD = _NS + r"/pods/(?P<name>[^/]+)"
_NAME = r"(?P<name>[^/]+)"
_KUEUE = r"/apis/kueue\.x-k8s\.io/v1beta2"  # read-only: tests set Kueue up with apply_kueue
_KUEUE_NS = _KUEUE + r"/namespaces/(?P<namespace>[^/]+)"
_VISIBILITY = r"/apis/visibility\.kueue\.x-k8s\.io/v1beta2"
ROUTES: list[tuple[str, str, Callable[..., None]]] = [
    ("GET", r"/version", _version),
    ("GET", _NS + r"/pods", _list("pods")),
    ("POST", _NS + r"/pods", _create_pod),
    ("GET", _POD, _get_pod),
    ("PATCH", _POD, _patch_pod),
    ("DELETE", _POD, _delete_pod),
    ("GET", _POD + r"/log", _pod_log),
    ("GET", _NS + r"/events", _list("events")),
    (
        "GET",
        _KUEUE + r"/(?P<plural>resourceflavors|clusterqueues|workloadpriorityclasses|cohorts)",
        _list(""),
    ),
    (
        "GET",
        _KUEUE + r"/(?P<plural>resourceflavors|clusterqueues|workloadpriorityclasses|cohorts)/" + _NAME,
        _kueue_get,
    ),
    ("GET", _KUEUE + r"/(?P<plural>localqueues|workloads)", _list("")),
    ("GET", _KUEUE_NS + r"/(?P<plural>localqueues|workloads)", _list("")),
    ("GET", _KUEUE_NS + r"/(?P<plural>localqueues|workloads)/" + _NAME, _kueue_get),
    ("GET", _VISIBILITY + r"/clusterqueues/(?P<cluster_queue>[^/]+)/pendingworkloads", _pending_workloads),
    (
        "GET",
        _VISIBILITY + r"/namespaces/(?P<namespace>[^/]+)/localqueues/(?P<local_queue>[^/]+)/pendingworkloads",
        _pending_workloads,
    ),
]
_COMPILED = [(method, re.compile(f"^{pattern}$"), route) for method, pattern, route in ROUTES]


def _route(method: str, path: str) -> tuple[Callable[..., None], dict[str, str]]:
    allowed = []
    for route_method, pattern, route in _COMPILED:
        match = pattern.match(path)
        if match and route_method == method:
            return route, match.groupdict()
        if match:
            allowed.append(route_method)
    if allowed:
        raise ApiError(405, f"the emulator serves only {'/'.join(allowed)} on {path}")
    raise ApiError(404, "the server could not find the requested resource")
