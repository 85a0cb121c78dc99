"""ServingController: the one writer of one TF Serving's model list.

HandleReloadConfigRequest replaces the whole list, so loads and unloads are not sent as they
come: they change the desired list, and a single writer sends it, one call at a time.  Changes
that arrive while a call is in flight are batched into the next call.  A load then waits for
its version to be AVAILABLE by polling GetModelStatus with a short, growing back-off (the
reload call only waits for NEW names, not for a new version of a known name).

A load that never finishes must not freeze the node: TF Serving's reload call waits for the
new names' loads, holding its config lock, so a hung load would hold every later write (and
with it every other load and unload) until ``load_timeout``.  Each write is bounded by
``write_timeout``; one that runs out makes the loads STUCK: no further write is sent until the
versions that write left loading have settled (AVAILABLE, failed, or gone with a TF Serving
restart), checked with GetModelStatus every ``stuck_poll`` seconds.  Meanwhile what is loaded
keeps being served, and new loads fail at once with UNAVAILABLE about the model only
(``node_wide=False``), which routers answer by trying the model's next owner (a model that
TF Serving is loading is waited for instead); unloads and label changes are kept and sent
with the first write after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tfscache.errors import Code, ModelLoadError, ServingError, deadline, unavailable
from tfscache.interfaces import IServingBackend
from tfscache.proto import model_service_pb2 as pb
from tfscache.util.grpc_twisted import future_to_deferred

MODEL_SERVICE = "/tensorflow.serving.ModelService/"
State = pb.ModelVersionStatus


class _Method:
    def __init__(self, reactor: IReactorFromThreads, channel: grpc.Channel, name: str, request: Any,
                 response: Any) -> None:
        self._reactor = reactor
        self._call = channel.unary_unary(
            MODEL_SERVICE + name,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )

    def __call__(self, request: object, timeout: float, target: str) -> defer.Deferred[Any]:
        return future_to_deferred(self._reactor, self._call.future(request, timeout=timeout), target)


@implementer(IServingBackend)
class ServingController:
    log = Logger()

    def __init__(
        self,
        grpc_target: str,
        rest_base: str,
        reactor: Any,
        model_platform: str = "tensorflow",
        poll_initial: float = 0.02,
        poll_max: float = 0.5,
        rpc_timeout: float = 10.0,
    ) -> None:
        """``reactor``: gRPC's answers come back through it, and it times the polls and the
        reload's deadline (one clock)."""
        self.grpc_target = grpc_target
        self.rest_base = rest_base.rstrip("/")
        self.model_platform = model_platform
        self.clock: IReactorTime = reactor
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
        self._reload = _Method(reactor, self.channel, "HandleReloadConfigRequest",
                               pb.ReloadConfigRequest, pb.ReloadConfigResponse)
        self._status = _Method(reactor, self.channel, "GetModelStatus",
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
        # (generation, fired once sent, a load's)
        self._waiters: list[tuple[int, defer.Deferred[None], bool]] = []
        self.reloads_sent = 0
        self.reload_timeout = 30.0  # serving.config_write_timeout_seconds
        self.stuck_poll = 1.0
        # while a write ran out: since when, and the names whose loads it left unfinished
        self.stuck_since: float | None = None
        self._stuck_names: set[str] = set()
        self._stuck_dirty = False   # changes made while stuck, for the first write after
        self._stuck_listeners: list[Callable[[bool], None]] = []
        self._stuck_call: Any = None
        self._closed = False
        self.stale_end_grace = 3.0

    # -- the desired list and its single writer ----------------------------------------------
    def served(self) -> dict[str, set[int]]:
        return {name: set(vs) for name, (_bp, vs) in self._desired.items()}

    def _change(self, load: bool = False) -> defer.Deferred[None]:
        """Record a change; fire once a reload that includes it has been answered.  While the
        loads are stuck a load fails at once, any other change fires at once (it is sent with
        the first write after)."""
        self._generation += 1
        if self.stuck_since is not None:
            if load:
                return defer.fail(self.stuck_error())
            self._stuck_dirty = True
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append((self._generation, d, load))
        if not self._sending:
            self._send()
        return d

    # -- stuck loads -------------------------------------------------------------------------
    @property
    def loads_stuck(self) -> bool:
        return self.stuck_since is not None

    def refuses_load(self, name: str) -> bool:
        """While stuck, a load fails at once, except of a model TF Serving is loading (that
        load is waited for, as the request would on any other node)."""
        return self.stuck_since is not None and name not in self._stuck_names

    def subscribe_stuck(self, listener: Callable[[bool], None]) -> None:
        """``listener(True)`` when the loads get stuck, ``listener(False)`` when they are not."""
        self._stuck_listeners.append(listener)

    def stuck_reason(self) -> str | None:
        if self.stuck_since is None:
            return None
        names = ", ".join(sorted(self._stuck_names)) or "(none named)"
        return (f"TF Serving at {self.grpc_target} has not finished loading {names} for "
                f"{self.clock.seconds() - self.stuck_since:.0f}s: cold loads go to other owners until it does")

    def stuck_error(self) -> ServingError:
        return unavailable(f"No load on this node now: {self.stuck_reason()}", node_wide=False)

    def _get_stuck(self, request: pb.ReloadConfigRequest) -> None:
        # the names of that write whose versions were not seen AVAILABLE: TF Serving's reload
        # call waits for some of them
        self._stuck_names = {mc.name for mc in request.config.model_config_list.config
                             if any((mc.name, v) not in self._available
                                    for v in mc.model_version_policy.specific.versions)}
        self.stuck_since = self.clock.seconds()
        self.log.warn("TF Serving at {target} did not take the model list within {seconds:g}s "
                      "(serving.config_write_timeout_seconds): loads of {names} have not finished; "
                      "loaded models are served, cold loads go to other owners until they do",
                      target=self.grpc_target, seconds=self.reload_timeout,
                      names=", ".join(sorted(self._stuck_names)) or "(none named)")
        for listener in self._stuck_listeners:
            listener(True)
        self._poll_stuck_later()

    def _poll_stuck_later(self) -> None:
        if not self._closed:
            self._stuck_call = self.clock.callLater(self.stuck_poll, self._poll_stuck)

    def _poll_stuck(self) -> None:
        self._stuck_call = None
        d = defer.ensureDeferred(self._still_loading(sorted(self._stuck_names)))

        def judged(loading: set[str]) -> None:
            self._stuck_names = loading
            if loading:
                self._poll_stuck_later()
            elif not self._closed:
                self._unstick()

        def failed(_f: Failure) -> None:  # TF Serving unreachable: ask again (the monitor reports it)
            self._poll_stuck_later()

        d.addCallbacks(judged, failed)

    async def _still_loading(self, names: list[str]) -> set[str]:
        loading = set()
        for name in names:
            try:
                resp = await self.status(name, timeout=min(self.rpc_timeout, 2.0))
            except ServingError as e:
                if e.code == Code.NOT_FOUND:  # gone (TF Serving restarted): nothing waits for it
                    continue
                raise
            if any(st.state in (State.START, State.LOADING) for st in resp.model_version_status):
                loading.add(name)
        return loading

    def _unstick(self) -> None:
        assert self.stuck_since is not None
        self.log.info("TF Serving at {target} finished the loads it was stuck on after {seconds:.1f}s: "
                      "loads go on here", target=self.grpc_target, seconds=self.clock.seconds() - self.stuck_since)
        self.stuck_since = None
        self._sending = False
        for listener in self._stuck_listeners:
            listener(False)
        if self._stuck_dirty or self._waiters:
            self._stuck_dirty = False
            self._waiters.append((self._generation, defer.Deferred(), False))
            self._send()

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
            if resp.status.error_code == Code.DEADLINE_EXCEEDED:  # a server that honours the deadline
                self._timed_out(generation, request)
                return
            if resp.status.error_code:
                self.log.warn("reload config: {msg}", msg=resp.status.error_message)
            self._settle(generation, None)

        def failed(f: Failure) -> None:
            err = f.value if isinstance(f.value, ServingError) else unavailable(str(f.value))
            if err.code == Code.DEADLINE_EXCEEDED:
                self._timed_out(generation, request)
            else:
                self.log.warn("reload config failed: {err}", err=err.message)
                self._settle(generation, err)

        d.addCallbacks(answered, failed)

    def _timed_out(self, generation: int, request: pb.ReloadConfigRequest) -> None:
        """The write ran out: TF Serving took the list (its loads go on, each load's status
        tells its waiter), but may hold its config lock until they end: stuck."""
        done = [w for w in self._waiters if w[0] <= generation]
        later = [w for w in self._waiters if w[0] > generation]
        self._waiters = []
        self._get_stuck(request)
        for _gen, d, _load in done:
            d.callback(None)
        for _gen, d, load in later:
            if load:
                d.errback(self.stuck_error())
            else:
                self._stuck_dirty = True
                d.callback(None)

    def _settle(self, generation: int, error: ServingError | None) -> None:
        done = [w for w in self._waiters if w[0] <= generation]
        self._waiters = [w for w in self._waiters if w[0] > generation]
        self._sending = False
        if self._waiters:
            self._send()
        for _gen, d, _load in done:
            if error is None:
                d.callback(None)
            else:
                d.errback(ServingError(error.code, f"TF Serving at {self.grpc_target}: {error.message}",
                                      error.node_wide))

    # -- IServingBackend ---------------------------------------------------------------------
    def load(self, name: str, version: int, base_path: str, timeout: float) -> defer.Deferred[None]:
        started = self.clock.seconds()
        # TF Serving's reload call waits for NEW names: once it answers, their state is this
        # attempt's.  A new version of a known name may still show an older END for a while.
        new_name = name not in self._desired
        if self.refuses_load(name):
            return defer.fail(self.stuck_error())
        _bp, versions = self._desired.setdefault(name, (base_path, set()))
        versions.add(version)
        if self.stuck_since is not None:
            # TF Serving is loading it (the write that ran out has it): wait for its status;
            # the list goes out with the first write after
            self._stuck_dirty = True
            d: defer.Deferred[None] = defer.succeed(None)
        else:
            d = self._change(load=True)
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

        def judge(f: Failure) -> Failure | None:
            if isinstance(f.value, ServingError) and f.value.code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT):
                return None
            return f

        return self.status("__tfscache_health__", timeout=2.0).addCallbacks(lambda _: None, judge)

    @defer.inlineCallbacks
    def _wait_available(self, name: str, version: int, deadline_at: float, new_name: bool = False):  # type: ignore[no-untyped-def]
        delay = self.poll_initial
        started = self.clock.seconds()
        progressed = new_name  # saw START/LOADING of this attempt (or the reload waited for it)
        while True:
            remaining = deadline_at - self.clock.seconds()
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
                    stale = not progressed and self.clock.seconds() - started < self.stale_end_grace
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
        self._closed = True
        if self._stuck_call is not None and self._stuck_call.active():
            self._stuck_call.cancel()
        self.channel.close()
