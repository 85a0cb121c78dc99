"""The admin API under ``/admin`` on the REST port: off by default, bearer token when on.

    GET  /admin/models                                   models this node holds, with state
    POST /admin/models/{name}[/versions/{v}]:preload     fetch and load now
    POST /admin/models/{name}/versions/{v}:pin|:unpin    never evict / evictable again
    POST /admin/models/{name}/versions/{v}:evict         unload and delete from disk
    GET  /admin/members                                  the cluster members this node sees
    GET  /admin/owners/{name}                            which members own a model name

Six routes, matched here by expression on the percent-decoded path: a web framework would
answer some requests in its own (HTML) formats where this API answers JSON.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer
from twisted.logger import Logger

from tfscache.errors import Code, ServingError, invalid
from tfscache.frontend.errors import as_serving_error
from tfscache.modelspec import ModelId, validate_name, validate_version
from tfscache.node.manager import CacheManager
from tfscache.wire import HttpReply, HttpRequest, header_value

_JSON = [(b"Content-Type", b"application/json")]
_NAME = r"([^/:]+)"
_ROUTES: list[tuple[bytes, re.Pattern[str], str]] = [
    (b"GET", re.compile(r"/admin/models"), "models"),
    (b"GET", re.compile(r"/admin/members"), "list_members"),
    (b"GET", re.compile(rf"/admin/owners/{_NAME}"), "list_owners"),
    (b"POST", re.compile(rf"/admin/models/{_NAME}:preload"), "preload_latest"),
    (b"POST", re.compile(rf"/admin/models/{_NAME}/versions/([^/:]+):([^/:]+)"), "version_action"),
]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class AdminApi:
    log = Logger()

    def __init__(
        self,
        cache: CacheManager,
        token: str,
        members: Callable[[], list[dict[str, Any]]] = lambda: [],
        owners: Callable[[str], list[dict[str, Any]]] = lambda name: [],
    ) -> None:
        self.cache, self.token = cache, token.encode()
        self.members, self.owners = members, owners

    # -- plumbing ----------------------------------------------------------------------------
    def handle(self, request: HttpRequest, path: str) -> defer.Deferred[HttpReply]:
        """Answer one request under /admin (``path``: the request's path, still encoded)."""
        if not self._authorised(request):
            return defer.succeed(HttpReply(
                401, json.dumps({"error": "A valid bearer token is required"}).encode(),
                [*_JSON, (b"WWW-Authenticate", b'Bearer realm="tfscache admin"')]))
        try:
            decoded = unquote(path, errors="strict")
        except UnicodeDecodeError:
            decoded = "\x00"
        work = _bind(_not_found, (path,))
        if not _CONTROL.search(decoded):
            for method, pattern, route in _ROUTES:
                m = pattern.fullmatch(decoded)
                if m is not None and request.method.upper() == method:
                    work = _bind(getattr(self, route), m.groups())
                    break

        def ok(result: Any) -> HttpReply:
            return HttpReply(200, json.dumps(result).encode(), list(_JSON))

        def failed(f: Any) -> HttpReply:
            err = as_serving_error(f)
            return HttpReply(err.http_status, json.dumps({"error": err.message}).encode(), list(_JSON))

        return defer.maybeDeferred(work).addCallbacks(ok, failed)

    def _authorised(self, request: HttpRequest) -> bool:
        header = header_value(request.headers, b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    @staticmethod
    def _model_id(name: str, version: str) -> ModelId:
        try:
            v = int(version)
        except ValueError:
            raise invalid(f"Invalid model version: {version}")
        return ModelId(validate_name(name), validate_version(v))

    # -- routes ------------------------------------------------------------------------------
    def models(self) -> Any:
        return {"models": self.cache.snapshot()}

    def list_members(self) -> Any:
        return {"members": self.members()}

    def list_owners(self, name: str) -> Any:
        return {"name": validate_name(name), "owners": self.owners(name)}

    def preload_latest(self, name: str) -> Any:
        return defer.ensureDeferred(self._preload(name, None))

    def version_action(self, name: str, version: str, action: str) -> Any:
        actions = {"preload": self._preload_version, "pin": self._pin, "unpin": self._unpin,
                   "evict": self._evict}
        if action not in actions:
            raise invalid(f"Unknown admin action: {action}")
        return actions[action](name, version)

    async def _preload(self, name: str, version: int | None) -> dict[str, Any]:
        mid = await self.cache.resolve(validate_name(name), version)
        lease = await self.cache.acquire(mid)
        lease.release()
        self.log.info("admin preload model={model} version={version}", model=mid.name, version=mid.version)
        result: dict[str, Any] = {"model": self._describe(mid)}
        owners = self.owners(mid.name)
        if owners and not any(o.get("self") for o in owners):
            # loaded here as asked, but the routers send this name's requests to its owners:
            # say so rather than forward (the owners' admin API may be off or use another token)
            ids = ", ".join(str(o["id"]) for o in owners)
            result["owners"] = owners
            result["warning"] = (f"this node is not an owner of model {mid.name}: routers send its requests "
                                 f"to {ids}; preload it there (tfscache --url <owner> preload {mid.name})")
            self.log.warn("admin preload model={model} version={version} on a node that does not own it; "
                          "owners: {owners}", model=mid.name, version=mid.version, owners=ids)
        return result

    def _preload_version(self, name: str, version: str) -> defer.Deferred[dict[str, Any]]:
        mid = self._model_id(name, version)
        return defer.ensureDeferred(self._preload(mid.name, mid.version))

    def _pin(self, name: str, version: str) -> defer.Deferred[dict[str, Any]]:
        mid = self._model_id(name, version)
        return defer.ensureDeferred(self._pin_known(mid))

    async def _pin_known(self, mid: ModelId) -> dict[str, Any]:
        if mid not in self.cache.entries:
            # a pin ahead of the first load is fine, of a version the source lacks is not: it
            # fails as a request for it would (NOT_FOUND), leaving no entry behind
            await self.cache.resolve(mid.name, mid.version)
        self.cache.pin(mid, True)
        self.log.info("admin pin model={model} version={version}", model=mid.name, version=mid.version)
        return {"model": self._describe(mid)}

    def _unpin(self, name: str, version: str) -> dict[str, Any]:
        mid = self._model_id(name, version)
        self._describe(mid)  # NOT_FOUND for a version this node does not hold
        self.cache.pin(mid, False)
        self.log.info("admin unpin model={model} version={version}", model=mid.name, version=mid.version)
        return {"model": self._describe(mid)}

    def _evict(self, name: str, version: str) -> defer.Deferred[dict[str, Any]]:
        mid = self._model_id(name, version)
        return defer.ensureDeferred(self.cache.evict(mid)).addCallback(lambda _: {"evicted": str(mid)})

    def _describe(self, mid: ModelId) -> dict[str, Any]:
        entry = self.cache.entries.get(mid)
        if entry is None:
            raise ServingError(Code.NOT_FOUND, f"Model {mid.name} version {mid.version} is not on this node")
        return entry.describe()


def _bind(route: Callable[..., Any], args: tuple[str, ...]) -> Callable[[], Any]:
    return lambda: route(*args)


def _not_found(path: str) -> Any:
    raise ServingError(Code.NOT_FOUND, f"No admin API at {path}")
