"""The seams of tfscache: model sources, the TF Serving backend, the node cache, discovery.

Every method that may wait returns a Deferred; implementations that wrap blocking libraries
run them in Twisted's thread pool, never on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from tfscache.cluster.members import Member
    from tfscache.modelspec import ModelId, ModelRef, RestCall
    from tfscache.node.manager import Lease
    from tfscache.proto.model_service_pb2 import GetModelStatusResponse
    from tfscache.wire import HttpReply, HttpRequest, Metadata


class IModelProvider(Interface):
    """A source of models laid out as TF Serving expects: ``<name>/<int version>/saved_model.pb``."""

    kind = Attribute("Short name of the provider type, e.g. 'disk' or 's3'.")

    def list_versions(name: str) -> Deferred[list[int]]:
        """Fire with the version numbers the source holds for ``name``, ascending.

        Fires with an empty list when the model does not exist.  Listings may be cached
        briefly (see the provider's ``listing_ttl``)."""

    def version_size(name: str, version: int) -> Deferred[int]:
        """Fire with the size in bytes of one version (the sum of its files)."""

    def fetch(name: str, version: int, destination: str) -> Deferred[int]:
        """Copy one version into the directory ``destination``, which does not exist yet.

        The copy is made in a temporary directory beside ``destination`` and renamed into
        place, so a half-copied model is never visible.  Fires with the bytes copied.  On
        failure nothing is left at ``destination`` and the Deferred fails with a
        ``tfscache.errors.ServingError``."""

    def check() -> Deferred[None]:
        """Fire if the source is reachable; fail otherwise (for readiness probes)."""


class IVersionLabels(Interface):
    """A model source that also declares version labels (label -> version) per model."""

    def list_labels(name: str) -> Deferred[dict[str, int]]:
        """Fire with the model's labels ({} when it declares none); cached like listings."""


class IServingBackend(Interface):
    """One TF Serving instance, driven through its ModelService.

    There is exactly one writer of the model list per backend: loads and unloads are
    batched into whole-list HandleReloadConfigRequest calls."""

    grpc_target = Attribute("host:port of the backend's gRPC API.")
    rest_base = Attribute("http://host:port of the backend's REST API.")

    def load(name: str, version: int, base_path: str, timeout: float) -> Deferred[None]:
        """Add the model id to the served list and fire when it is AVAILABLE.

        Fails with a ServingError (DEADLINE_EXCEEDED on timeout, the backend's error when the
        load fails, UNAVAILABLE when the backend cannot be reached)."""

    def unload(name: str, version: int) -> Deferred[None]:
        """Remove the model id from the served list; fire once the new list is accepted."""

    def reset() -> Deferred[None]:
        """Send an empty model list: the backend serves nothing (used at start-up)."""

    def forget(name: str, version: int) -> None:
        """Drop a model id from the list without sending it (the next change sends it)."""

    def resend() -> Deferred[None]:
        """Send the current list again (after the backend restarted empty)."""

    def status(name: str, timeout: float | None = None) -> Deferred[GetModelStatusResponse]:
        """GetModelStatus for a model name."""

    def check() -> Deferred[None]:
        """Fire if the backend answers; fail with UNAVAILABLE otherwise."""


class IModelCache(Interface):
    """The node's brain: makes a model AVAILABLE in the local backend on demand."""

    def resolve(name: str, version: int | None, label: str | None) -> Deferred[ModelId]:
        """Turn a request's name plus optional version or label into a concrete model id."""

    def acquire(model_id: ModelId, timeout: float | None = None) -> Deferred[Lease]:
        """Fire with a lease once ``model_id`` is AVAILABLE.  The model is not unloaded until
        the lease is released.  All callers for one cold model share one fetch and one load."""

    def lease_now(name: str, version: int | None) -> Lease | None:
        """The warm path: a lease at once when version ``version`` of ``name`` is AVAILABLE
        (the request counted as acquire counts it), else None (then resolve and acquire)."""

    def snapshot() -> list[dict[str, Any]]:
        """The state of every model this node knows (for the admin API and tests)."""


class IDiscovery(Interface):
    """Cluster membership: publishes this node and tells the router the live members."""

    def members() -> list[Member]:
        """The last known live members (never blocks; survives a lost discovery backend)."""

    def subscribe(callback: Callable[[list[Member]], None]) -> None:
        """Call ``callback(members)`` whenever the member list changes."""

    def publish() -> Deferred[None]:
        """Announce this node as a live member."""

    def withdraw() -> Deferred[None]:
        """Remove this node from the member list (graceful shutdown)."""


class IRequestHandler(Interface):
    """Serves one client request for a model: the local node, or the router in front of it."""

    def rest(call: RestCall, request: HttpRequest) -> Deferred[HttpReply]:
        """Answer a parsed TF Serving REST call (``tfscache.modelspec.RestCall``) whose raw
        request (``tfscache.node.local.HttpRequest``) is passed on unchanged."""

    def grpc(method: str, ref: ModelRef, payload: bytes, timeout: float | None,
             metadata: Metadata = ()) -> Deferred[bytes]:
        """Answer a gRPC call (full method path) whose serialized request is ``payload``;
        ``metadata``: the client's own (key, value) pairs, passed on like REST headers."""
