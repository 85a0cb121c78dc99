"""ServingController: the one writer of one TF Serving's model list.

HandleReloadConfigRequest replaces the whole list, so loads and unloads are not sent as they
come: they change the desired list, and a single writer sends it, one call at a time.  Changes
that arrive while a call is in flight are batched into the next call.  A load then waits for
its version to be AVAILABLE by polling GetModelStatus with a short, growing back-off (the
reload call only waits for NEW names, not for a new version of a known name).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from tfscache.errors import Code, ModelLoadError, ServingError, deadline, unavailable
from tfscache.interfaces import IServingBackend
from tfscache.proto import model_service_pb2 as pb
from tfscache.util.grpc_twisted import future_to_deferred

MODEL_SERVICE = "/tensorflow.serving.ModelService/"
State = pb.ModelVersionStatus


class _Method:
    def __init__(self, channel: grpc.Channel, name: str, request: Any, response: Any) -> None:
        self._call = channel.unary_unary(
            MODEL_SERVICE + name,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )

    def __call__(self, request: object, timeout: float, target: str) -> defer.Deferred:
        return future_to_deferred(self._call.future(request, timeout=timeout), target)


@implementer(IServingBackend)
class ServingController:
    log = Logger()

    def __init__(
        self,
        grpc_target: str,
        rest_base: str,
        model_platform: str = "tensorflow",
        clock: IReactorTime | None = None,
        poll_initial: float = 0.02,
        poll_max: float = 0.5,
        rpc_timeout: float = 10.0,
    ) -> None:
        from twisted.internet import reactor

        self.grpc_target = grpc_target
        self.rest_base = rest_base.rstrip("/")
        self.model_platform = model_platform
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self.poll_initial, self.poll_max, self.rpc_timeout = poll_initial, poll_max, rpc_timeout
        self.channel = grpc.insecure_channel(
            grpc_target, options=[("grpc.max_receive_message_length", 2**31 - 1),
                                  ("grpc.max_send_message_length", 2**31 - 1),
                                  # TF Serving is this node's own, nearby: after it restarts,
                                  # reconnect within a second, not after gRPC's default back-off
                                  # (up to 120 s), so the node notices it is back at once
                                  ("grpc.initial_reconnect_backoff_ms", 200),
                                  ("grpc.max_reconnect_backoff_ms", 1000)]
        )
        self._reload = _Method(self.channel, "HandleReloadConfigRequest",
                               pb.ReloadConfigRequest, pb.ReloadConfigResponse)
        self._status = _Method(self.channel, "GetModelStatus",
                               pb.GetModelStatusRequest, pb.GetModelStatusResponse)
        # desired list: name -> (base_path, versions)
        self._desired: dict[str, tuple[str, set[int]]] = {}
        # version labels as the model source declares them, and the versions seen AVAILABLE:
        # TF Serving refuses a whole config whose label names a version it does not serve yet
        # (FAILED_PRECONDITION), so the config carries only labels of AVAILABLE versions
        self._labels: dict[str, dict[str, int]] = {}
        self._available: set[tuple[str, int]] = set()
        self._generation = 0        # bumped on every change of the desired list
        self._sending = False       # one reload call at a time
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []
        self.reloads_sent = 0
        self.reload_timeout = 300.0
        self.now: Callable[[], float] = time.monotonic
        self.stale_end_grace = 3.0

    # -- the desired list and its single writer ----------------------------------------------
    def served(self) -> dict[str, set[int]]:
        return {name: set(vs) for name, (_bp, vs) in self._desired.items()}

    def _change(self) -> defer.Deferred[None]:
        """Record a change; fire once a reload that includes it has been answered."""
        self._generation += 1
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((self._generation, d))
        if not self._sending:
            self._send()
        return d

    def _config(self) -> pb.ReloadConfigRequest:
        req = pb.ReloadConfigRequest()
        for name in sorted(self._desired):
            base_path, versions = self._desired[name]
            mc = req.config.model_config_list.config.add()
            mc.name, mc.base_path, mc.model_platform = name, base_path, self.model_platform
            mc.model_version_policy.specific.versions.extend(sorted(versions))
            for label, version in sorted(self._effective_labels(name).items()):
                mc.version_labels[label] = version
        return req

    def _effective_labels(self, name: str) -> dict[str, int]:
        entry = self._desired.get(name)
        if entry is None:
            return {}
        return {label: v for label, v in self._labels.get(name, {}).items()
                if v in entry[1] and (name, v) in self._available}

    def set_labels(self, name: str, labels: dict[str, int]) -> defer.Deferred[None]:
        """The model's labels (from its source); sent when they change what TF Serving has."""
        before = self._effective_labels(name)
        if labels:
            self._labels[name] = dict(labels)
        else:
            self._labels.pop(name, None)
        if self._effective_labels(name) == before:
            return defer.succeed(None)
        return self._change()

    def _mark_available(self, name: str, version: int) -> defer.Deferred[None]:
        """Once a version is AVAILABLE its labels may go to TF Serving: a load returns after
        they have, so a request by label finds TF Serving knowing it."""
        before = self._effective_labels(name)
        self._available.add((name, version))
        if self._effective_labels(name) == before:
            return defer.succeed(None)
        return self._change()

    def _drop_available(self, name: str, version: int) -> None:
        self._available.discard((name, version))

    def _send(self) -> None:
        self._sending = True
        generation = self._generation
        request = self._config()
        self.reloads_sent += 1
        d = self._reload(request, self.reload_timeout, self.grpc_target)

        def answered(resp: pb.ReloadConfigResponse) -> None:
            # A non-OK status names a model that failed to load; each load learns its own
            # outcome from GetModelStatus, so the list itself counts as accepted.
            if resp.status.error_code:
                self.log.warn("reload config: {msg}", msg=resp.status.error_message)
            self._settle(generation, None)

        def failed(f: defer.Failure) -> None:
            err = f.value if isinstance(f.value, ServingError) else unavailable(str(f.value))
            if err.code == Code.DEADLINE_EXCEEDED:
                # TF Serving went on loading; statuses tell the rest
                self._settle(generation, None)
            else:
                self.log.warn("reload config failed: {err}", err=err.message)
                self._settle(generation, err)

        d.addCallbacks(answered, failed)

    def _settle(self, generation: int, error: ServingError | None) -> None:
        done = [w for w in self._waiters if w[0] <= generation]
        self._waiters = [w for w in self._waiters if w[0] > generation]
        self._sending = False
        if self._waiters:
            self._send()
        for _gen, d in done:
            if error is None:
                d.callback(None)
            else:
                d.errback(ServingError(error.code, f"TF Serving at {self.grpc_target}: {error.message}",
                                      error.node_wide))

    # -- IServingBackend ---------------------------------------------------------------------
    def load(self, name: str, version: int, base_path: str, timeout: float) -> defer.Deferred[None]:
        started = self.now()
        # TF Serving's reload call waits for NEW names: once it answers, their state is this
        # attempt's.  A new version of a known name may still show an older END for a while.
        new_name = name not in self._desired
        _bp, versions = self._desired.setdefault(name, (base_path, set()))
        versions.add(version)
        d = self._change()
        d.addCallback(lambda _: self._wait_available(name, version, started + timeout, new_name))
        d.addCallback(lambda _: self._mark_available(name, version))
        return d

    def unload(self, name: str, version: int) -> defer.Deferred[None]:
        entry = self._desired.get(name)
        if entry is None or version not in entry[1]:
            return defer.succeed(None)
        entry[1].discard(version)
        self._drop_available(name, version)
        if not entry[1]:
            del self._desired[name]
        return self._change()

    def forget(self, name: str, version: int) -> None:
        """Drop a model from the list without sending (it failed; the next change sends)."""
        self._drop_available(name, version)
        entry = self._desired.get(name)
        if entry is not None:
            entry[1].discard(version)
            if not entry[1]:
                del self._desired[name]

    def reset(self) -> defer.Deferred[None]:
        self._desired.clear()
        self._available.clear()
        return self._change()

    def resend(self) -> defer.Deferred[None]:
        """Send the current list again (after the backend restarted empty)."""
        return self._change()

    def status(self, name: str, timeout: float | None = None) -> defer.Deferred[pb.GetModelStatusResponse]:
        req = pb.GetModelStatusRequest()
        req.model_spec.name = name
        return self._status(req, timeout or self.rpc_timeout, self.grpc_target)

    def check(self) -> defer.Deferred[None]:
        """Alive if GetModelStatus answers at all (NOT_FOUND for a name nobody serves is fine)."""

        def judge(f: defer.Failure) -> None:
            if isinstance(f.value, ServingError) and f.value.code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT):
                return None
            return f  # type: ignore[return-value]

        return self.status("__tfscache_health__", timeout=2.0).addCallbacks(lambda _: None, judge)

    @defer.inlineCallbacks
    def _wait_available(self, name: str, version: int, deadline_at: float, new_name: bool = False):  # type: ignore[no-untyped-def]
        delay = self.poll_initial
        started = self.now()
        progressed = new_name  # saw START/LOADING of this attempt (or the reload waited for it)
        while True:
            remaining = deadline_at - self.now()
            if remaining <= 0:
                raise deadline(
                    f"Model {name} version {version} was not AVAILABLE in TF Serving within the load timeout"
                )
            try:
                resp = yield self.status(name, timeout=min(self.rpc_timeout, remaining))
            except ServingError as e:
                if e.code != Code.NOT_FOUND:  # not found: not yet picked up by the file-system poll
                    raise
            else:
                for st in resp.model_version_status:
                    if st.version != version:
                        continue
                    if st.state == State.AVAILABLE:
                        return None
                    if st.state in (State.START, State.LOADING):
                        progressed = True
                    # An END left by an earlier unload or failure stays until the backend's
                    # next file-system poll starts this attempt: only an END with an error,
                    # after this attempt started (or a grace period), is this load's failure.
                    stale = not progressed and self.now() - started < self.stale_end_grace
                    if st.state == State.END and st.status.error_code and not stale:
                        # TF Serving answers a request for a version that failed to load
                        # with NOT_FOUND (it serves no such servable), whatever the load's
                        # own code: the same code here, with the load's error in the text
                        raise ModelLoadError(
                            Code.NOT_FOUND,
                            f"Model {name} version {version} failed to load: {st.status.error_message}",
                        )
            yield task.deferLater(self.clock, min(delay, max(remaining, 0)), lambda: None)
            delay = min(delay * 1.5, self.poll_max)

    def close(self) -> None:
        self.channel.close()
