"""The admin API under ``/admin`` on the REST port: off by default, bearer token when on.

    GET  /admin/models                                   models this node holds, with state
    POST /admin/models/{name}[/versions/{v}]:preload     fetch and load now
    POST /admin/models/{name}/versions/{v}:pin|:unpin    never evict / evictable again
    POST /admin/models/{name}/versions/{v}:evict         unload and delete from disk
    GET  /admin/members                                  the cluster members this node sees
    GET  /admin/owners/{name}                            which members own a model name
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from tfscache.errors import Code, ServingError, invalid
from tfscache.frontend.errors import as_serving_error
from tfscache.modelspec import ModelId, validate_name, validate_version
from tfscache.node.manager import CacheManager


class AdminApi:
    log = Logger()
    app = Klein()

    def __init__(
        self,
        cache: CacheManager,
        token: str,
        members: Callable[[], list[dict[str, Any]]] = lambda: [],
        owners: Callable[[str], list[dict[str, Any]]] = lambda name: [],
    ) -> None:
        self.cache, self.token = cache, token.encode()
        self.members, self.owners = members, owners

    def resource(self) -> Any:
        return self.app.resource()

    # -- plumbing ----------------------------------------------------------------------------
    def _authorised(self, request: IRequest) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    def _run(self, request: IRequest, work: Callable[[], Any]) -> defer.Deferred[bytes]:
        request.setHeader(b"content-type", b"application/json")
        if not self._authorised(request):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="tfscache admin"')
            return defer.succeed(json.dumps({"error": "A valid bearer token is required"}).encode())

        def ok(result: Any) -> bytes:
            return json.dumps(result).encode()

        def failed(f: Any) -> bytes:
            err = as_serving_error(f)
            request.setResponseCode(err.http_status)
            return json.dumps({"error": err.message}).encode()

        return defer.maybeDeferred(work).addCallbacks(ok, failed)

    @staticmethod
    def _model_id(name: str, version: str) -> ModelId:
        try:
            v = int(version)
        except ValueError:
            raise invalid(f"Invalid model version: {version}")
        return ModelId(validate_name(name), validate_version(v))

    # -- routes ------------------------------------------------------------------------------
    @app.route("/admin/models", methods=["GET"])
    def models(self, request: IRequest) -> Any:
        return self._run(request, lambda: {"models": self.cache.snapshot()})

    @app.route("/admin/members", methods=["GET"])
    def list_members(self, request: IRequest) -> Any:
        return self._run(request, lambda: {"members": self.members()})

    @app.route("/admin/owners/<name>", methods=["GET"])
    def list_owners(self, request: IRequest, name: str) -> Any:
        return self._run(request, lambda: {"name": validate_name(name), "owners": self.owners(name)})

    @app.route("/admin/models/<name>:preload", methods=["POST"])
    def preload_latest(self, request: IRequest, name: str) -> Any:
        return self._run(request, lambda: defer.ensureDeferred(self._preload(name, None)))

    @app.route("/admin/models/<name>/versions/<version>:<action>", methods=["POST"])
    def version_action(self, request: IRequest, name: str, version: str, action: str) -> Any:
        actions = {"preload": self._preload_version, "pin": self._pin, "unpin": self._unpin,
                   "evict": self._evict}
        if action not in actions:
            return self._run(request, lambda: defer.fail(invalid(f"Unknown admin action: {action}")))
        return self._run(request, lambda: actions[action](name, version))

    @app.route("/admin", branch=True)
    def unknown(self, request: IRequest) -> Any:
        path = request.path.decode("latin-1")
        return self._run(request, lambda: defer.fail(ServingError(Code.NOT_FOUND, f"No admin API at {path}")))

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

    def _pin(self, name: str, version: str) -> dict[str, Any]:
        mid = self._model_id(name, version)
        self.cache.pin(mid, True)
        self.log.info("admin pin model={model} version={version}", model=mid.name, version=mid.version)
        return {"model": self._describe(mid)}

    def _unpin(self, name: str, version: str) -> dict[str, Any]:
        mid = self._model_id(name, version)
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
