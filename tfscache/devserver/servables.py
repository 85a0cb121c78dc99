"""The DevServer's servable manager: TF Serving's ModelService semantics on TensorFlow.

- ``reload(config)`` REPLACES the model list; names left out are unloaded asynchronously;
  the call waits only for names that are new (AVAILABLE, or a load error).  Reloads are
  serialised.
- Aspired versions are the numeric children of ``base_path`` filtered by the version policy,
  re-read by a file-system poll thread (``--file_system_poll_wait_seconds``).
- A version goes START -> LOADING -> AVAILABLE; removed: UNLOADING -> END (END, not NOT_FOUND,
  after an unload).  A failed load is retried ``max_num_load_retries`` times, then ends with its
  error.  A new version loads before the old one of the same name is unloaded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tensorflow_serving.apis import model_management_pb2
from tensorflow_serving.config import model_server_config_pb2

from tfscache.devserver.models import DELAY_FILE, GATE_FILE
from tfscache.errors import Code, ServingError, invalid, not_found
from tfscache.modelspec import version_dirs

log = logging.getLogger("devserver")

START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50
STATE_NAMES = {0: "UNKNOWN", START: "START", LOADING: "LOADING", AVAILABLE: "AVAILABLE",
               UNLOADING: "UNLOADING", END: "END"}


class Loaded:
    """A SavedModel loaded as TF Serving loads it: its MetaGraph into a TensorFlow session,
    signatures run by feeding and fetching their tensors by name.  That serves TF1 and TF2
    models alike, including what TF2's object loader cannot (TF1 graphs whose signatures parse
    serialized ``tf.Example`` scalars, reference-typed variables), and calls a signature for any
    API without checking its method name, as TF Serving does by default."""

    def __init__(self, session: Any, signature_defs: dict[str, Any]) -> None:
        self.session = session
        self.signature_defs = signature_defs
        self._callables: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()

    def run(self, sig_name: str, feeds: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        """Run signature ``sig_name``: ``feeds`` by input alias (numpy arrays are fed as they
        are, other values converted to the input's dtype), ``outputs`` by alias (all when
        None).  Through a session callable, as TF Serving's C++ Session::Run: the shapes fed
        are not checked against the placeholders' (Python's ``Session.run`` would refuse a
        ``[3]`` tensor for a ``[?, 1]`` placeholder that TF Serving feeds happily)."""
        import numpy as np
        import tensorflow as tf
        from tensorflow.core.protobuf import config_pb2

        sig = self.signature_defs[sig_name]
        in_aliases = tuple(sorted(feeds))
        out_aliases = tuple(sorted(outputs if outputs else sig.outputs))
        values = []
        for alias in in_aliases:
            value = feeds[alias]
            if not isinstance(value, np.ndarray):
                dtype = tf.dtypes.as_dtype(sig.inputs[alias].dtype).base_dtype
                value = np.asarray(value, dtype=object if dtype == tf.string else dtype.as_numpy_dtype)
            values.append(value)
        key = (tuple(sig.inputs[a].name for a in in_aliases), tuple(sig.outputs[a].name for a in out_aliases))
        with self._lock:
            call = self._callables.get(key)
            if call is None:
                options = config_pb2.CallableOptions(feed=list(key[0]), fetch=list(key[1]))
                call = self._callables[key] = self.session._make_callable_from_options(options)
        results = call(*values)
        return dict(zip(out_aliases, results, strict=True))

    def close(self) -> None:
        self.session.close()


@dataclass
class Version:
    name: str
    version: int
    state: int = START
    error: ServingError | None = None
    loaded: Loaded | None = None
    aspired: bool = True
    attempt: int = 0
    path: str = ""


@dataclass
class ModelConfig:
    name: str
    base_path: str
    policy: str = "latest"           # latest | all | specific
    num_versions: int = 1
    specific: tuple[int, ...] = ()
    labels: dict[str, int] = field(default_factory=dict)


def load_saved_model(path: str) -> Loaded:
    import tensorflow as tf

    delay_file = os.path.join(path, DELAY_FILE)
    if os.path.exists(delay_file):
        with open(delay_file) as f:
            time.sleep(float(f.read().strip() or 0))
    while os.path.exists(os.path.join(path, GATE_FILE)):  # held by a test (models.hold_load)
        time.sleep(0.02)
    if not os.path.exists(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(f"Could not find SavedModel .pb at supplied export directory path: {path}")
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    try:
        with graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
    except BaseException:
        session.close()
        raise
    return Loaded(session, dict(meta_graph.signature_def))


class ServableManager:
    def __init__(self, poll_wait: float = 1.0, max_load_retries: int = 0, retry_interval: float = 1.0) -> None:
        self.poll_wait = poll_wait
        self.max_load_retries, self.retry_interval = max_load_retries, retry_interval
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.reload_lock = threading.Lock()  # TF Serving serialises config reloads
        self.configs: dict[str, ModelConfig] = {}
        self.labels: dict[str, dict[str, int]] = {}
        self.versions: dict[tuple[str, int], Version] = {}
        self.load_counts: dict[str, int] = {}
        self._stop = threading.Event()
        if poll_wait > 0:
            threading.Thread(target=self._poll, name="fs-poll", daemon=True).start()

    # -- configuration -----------------------------------------------------------------------
    def reload(self, config: model_server_config_pb2.ModelServerConfig, deadline: float | None) -> None:
        with self.reload_lock:
            new_configs = {}
            for mc in config.model_config_list.config:
                if not mc.name:
                    raise invalid("ModelConfig is missing a name")
                if mc.name in new_configs:
                    raise invalid(f"Illegal to list model {mc.name} multiple times in config list")
                new_configs[mc.name] = _model_config(mc)
            with self.lock:
                added = [n for n in new_configs if n not in self.configs]
                self.configs = new_configs
            self.reconcile()
            failure: ServingError | None = None
            try:
                self._wait_for(added, deadline)
            except ServingError as e:  # a model that failed: the others' labels still apply
                failure = e
            try:
                self._update_labels()
            except ServingError as e:
                failure = failure or e
            if failure is not None:
                raise failure

    def _update_labels(self) -> None:
        """TF Serving's rule (ServerCore::UpdateModelVersionLabelMap): a label may only name
        a version that is AVAILABLE; otherwise the reload fails and the labels stay as they
        were (the model list itself has been applied)."""
        with self.lock:
            labels: dict[str, dict[str, int]] = {}
            for name, mc in self.configs.items():
                for label, version in mc.labels.items():
                    ver = self.versions.get((name, version))
                    if ver is None or ver.state != AVAILABLE:
                        raise ServingError(
                            Code.FAILED_PRECONDITION,
                            f"Request to assign label to version {version} of model {name}, which "
                            "is not currently available for inference")
                    labels.setdefault(name, {})[label] = version
            self.labels = labels

    def _wait_for(self, names: list[str], deadline: float | None) -> None:
        with self.lock:
            while True:
                # every name settles (AVAILABLE or failed) before a failure is reported
                pending, failures = [], []
                for name in names:
                    vs = [v for (n, _), v in self.versions.items() if n == name and v.aspired]
                    failed = [v for v in vs if v.state == END and v.error is not None]
                    if failed:
                        failures.append(failed[0].error)
                    elif not any(v.state == AVAILABLE for v in vs):
                        pending.append(name)
                if not pending:
                    if failures:
                        raise failures[0]  # type: ignore[misc]
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ServingError(Code.DEADLINE_EXCEEDED, f"Models not loaded in time: {pending}")
                self.changed.wait(timeout=min(remaining or 0.5, 0.5))

    def reconcile(self) -> None:
        """Bring the versions in line with the configs and what is on disk."""
        with self.lock:
            aspired: dict[tuple[str, int], str] = {}
            for name, mc in self.configs.items():
                for v, dirname in _aspired_versions(mc).items():
                    aspired[(name, v)] = os.path.join(mc.base_path, dirname)
            for key, path in aspired.items():
                ver = self.versions.get(key)
                if ver is None or (ver.state == END and not ver.aspired):
                    ver = self.versions[key] = Version(*key)
                    self._start_load(ver, path)
                ver.aspired = True
            for key, ver in self.versions.items():
                if key not in aspired and ver.aspired:
                    ver.aspired = False
            self._unload_unaspired()
            self.changed.notify_all()

    def _unload_unaspired(self) -> None:
        for ver in list(self.versions.values()):
            if ver.aspired or ver.state in (UNLOADING, END):
                continue
            if ver.state == AVAILABLE:
                # a new version of the same name loads before the old one goes
                newer_loading = any(
                    v.aspired and v.state in (START, LOADING)
                    for (n, _), v in self.versions.items() if n == ver.name
                ) and ver.name in self.configs
                if newer_loading:
                    continue
                ver.state = UNLOADING
                threading.Thread(target=self._unload, args=(ver,), daemon=True).start()

    def _unload(self, ver: Version) -> None:
        with self.lock:
            loaded, ver.loaded = ver.loaded, None
            ver.state = END
            ver.error = None
            log.info("unloaded model=%s version=%d", ver.name, ver.version)
            if ver.aspired and self.versions.get((ver.name, ver.version)) is ver:
                # asked for again while its unload ran: load it again, as TF Serving does (a
                # version that ends while aspired would otherwise never come back)
                fresh = self.versions[(ver.name, ver.version)] = Version(ver.name, ver.version, path=ver.path)
                self._start_load(fresh, ver.path)
            self.changed.notify_all()
        if loaded is not None:
            loaded.close()

    def _start_load(self, ver: Version, path: str) -> None:
        ver.state, ver.path = START, path
        threading.Thread(target=self._load, args=(ver, path), daemon=True).start()

    def _load(self, ver: Version, path: str) -> None:
        with self.lock:
            ver.state = LOADING
            self.changed.notify_all()
        started = time.monotonic()
        error: ServingError | None = None
        for attempt in range(self.max_load_retries + 1):
            try:
                loaded = load_saved_model(path)
                break
            except Exception as e:  # a broken model is data, not a server bug
                error = ServingError(
                    Code.UNKNOWN if not isinstance(e, FileNotFoundError) else Code.NOT_FOUND,
                    f"Failed to load servable {ver.name} version {ver.version}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}",
                )
                if attempt < self.max_load_retries:
                    time.sleep(self.retry_interval)
        else:
            with self.lock:
                ver.state, ver.error = END, error
                log.warning("load failed model=%s version=%d: %s", ver.name, ver.version,
                            error.message if error else "")
                self.changed.notify_all()
            return
        with self.lock:
            if not ver.aspired:
                ver.state = END
                loaded.close()
            else:
                ver.loaded, ver.state, ver.error = loaded, AVAILABLE, None
                key = f"{ver.name}/{ver.version}"
                self.load_counts[key] = self.load_counts.get(key, 0) + 1
                log.info("loaded model=%s version=%d seconds=%.3f", ver.name, ver.version,
                         time.monotonic() - started)
            self._unload_unaspired()
            self.changed.notify_all()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_wait):
            try:
                self.reconcile()
            except Exception:  # keep polling whatever one pass hit
                log.exception("file-system poll failed")

    def stop(self) -> None:
        self._stop.set()

    # -- lookups -----------------------------------------------------------------------------
    def resolve(self, name: str, version: int | None, label: str | None) -> Version:
        """The servable a request names, or TF Serving's error."""
        if version is not None and label:
            raise invalid("Only one of version and version_label may be set")
        with self.lock:
            version = self._labelled(name, version, label)
            if version is not None:
                ver = self.versions.get((name, version))
                if ver is None or ver.state != AVAILABLE:
                    raise not_found(f"Servable not found for request: Specific({name}, {version})")
                return ver
            available = [v for (n, _), v in self.versions.items() if n == name and v.state == AVAILABLE]
            if not available:
                raise not_found(f"Servable not found for request: Latest({name})")
            return max(available, key=lambda v: v.version)

    def status(self, name: str, version: int | None, label: str | None) -> list[Version]:
        with self.lock:
            version = self._labelled(name, version, label)
            vs = sorted((v for (n, _), v in self.versions.items() if n == name),
                        key=lambda v: -v.version)
            if not vs:
                raise not_found(f"Could not find any versions of model {name}")
            if version is not None:
                vs = [v for v in vs if v.version == version]
                if not vs:
                    raise not_found(f"Could not find version {version} of model {name}")
            return vs

    def _labelled(self, name: str, version: int | None, label: str | None) -> int | None:
        if not label:
            return version
        version = self.labels.get(name, {}).get(label)
        if version is None:
            raise invalid(f"Unrecognized servable version label: {label}")
        return version

    def available(self) -> list[str]:
        with self.lock:
            return sorted(f"{n}/{v}" for (n, v), ver in self.versions.items() if ver.state == AVAILABLE)


def _model_config(mc: Any) -> ModelConfig:
    policy = mc.model_version_policy.WhichOneof("policy_choice") or "latest"
    out = ModelConfig(mc.name, mc.base_path, policy, labels=dict(mc.version_labels))
    if policy == "latest":
        out.num_versions = mc.model_version_policy.latest.num_versions or 1
    elif policy == "specific":
        out.specific = tuple(mc.model_version_policy.specific.versions)
    return out


def _aspired_versions(mc: ModelConfig) -> dict[int, str]:
    """Version -> directory name of the versions the policy wants (zero-padded names too)."""
    try:
        children = os.listdir(mc.base_path)
    except OSError:
        return {}
    on_disk = {v: n for v, n in version_dirs(children).items()
               if os.path.isdir(os.path.join(mc.base_path, n))}
    versions = sorted(on_disk)
    if mc.policy == "specific":
        versions = [v for v in versions if v in mc.specific]
    elif mc.policy != "all":
        versions = versions[-mc.num_versions:]
    return {v: on_disk[v] for v in versions}


def reload_response(error: ServingError | None) -> model_management_pb2.ReloadConfigResponse:
    resp = model_management_pb2.ReloadConfigResponse()
    if error is not None:
        resp.status.error_code = int(error.code)
        resp.status.error_message = error.message
    return resp
