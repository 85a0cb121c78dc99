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

from tfscache.devserver.models import DELAY_FILE
from tfscache.errors import Code, ServingError, invalid, not_found

log = logging.getLogger("devserver")

START, LOADING, AVAILABLE, UNLOADING, END = 10, 20, 30, 40, 50
STATE_NAMES = {0: "UNKNOWN", START: "START", LOADING: "LOADING", AVAILABLE: "AVAILABLE",
               UNLOADING: "UNLOADING", END: "END"}


@dataclass
class Loaded:
    """A loaded SavedModel: its TF2 object (callable signatures) and its SignatureDefs."""

    model: Any
    signature_defs: dict[str, Any]


@dataclass
class Version:
    name: str
    version: int
    state: int = START
    error: ServingError | None = None
    loaded: Loaded | None = None
    aspired: bool = True
    attempt: int = 0


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
    from tensorflow.core.protobuf import saved_model_pb2

    delay_file = os.path.join(path, DELAY_FILE)
    if os.path.exists(delay_file):
        with open(delay_file) as f:
            time.sleep(float(f.read().strip() or 0))
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm = saved_model_pb2.SavedModel.FromString(f.read())
    model = tf.saved_model.load(path, tags=["serve"])
    return Loaded(model, dict(sm.meta_graphs[0].signature_def))


class ServableManager:
    def __init__(self, poll_wait: float = 1.0, max_load_retries: int = 0, retry_interval: float = 1.0) -> None:
        self.poll_wait = poll_wait
        self.max_load_retries, self.retry_interval = max_load_retries, retry_interval
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.reload_lock = threading.Lock()  # TF Serving serialises config reloads
        self.configs: dict[str, ModelConfig] = {}
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
            self._wait_for(added, deadline)

    def _wait_for(self, names: list[str], deadline: float | None) -> None:
        with self.lock:
            while True:
                pending = []
                for name in names:
                    vs = [v for (n, _), v in self.versions.items() if n == name and v.aspired]
                    failed = [v for v in vs if v.state == END and v.error is not None]
                    if failed:
                        raise failed[0].error  # type: ignore[misc]
                    if not any(v.state == AVAILABLE for v in vs):
                        pending.append(name)
                if not pending:
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
                for v in _aspired_versions(mc):
                    aspired[(name, v)] = os.path.join(mc.base_path, str(v))
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
            ver.loaded = None
            ver.state = END
            ver.error = None
            log.info("unloaded model=%s version=%d", ver.name, ver.version)
            self.changed.notify_all()

    def _start_load(self, ver: Version, path: str) -> None:
        ver.state = START
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
        mc = self.configs.get(name)
        if mc is None or label not in mc.labels:
            raise invalid(f"Unrecognized servable version label: {label}")
        return mc.labels[label]

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


def _aspired_versions(mc: ModelConfig) -> list[int]:
    try:
        children = os.listdir(mc.base_path)
    except OSError:
        return []
    on_disk = sorted(int(c) for c in children if c.isdigit() and os.path.isdir(os.path.join(mc.base_path, c)))
    if mc.policy == "all":
        return on_disk
    if mc.policy == "specific":
        return [v for v in on_disk if v in mc.specific]
    return on_disk[-mc.num_versions:]


def reload_response(error: ServingError | None) -> model_management_pb2.ReloadConfigResponse:
    resp = model_management_pb2.ReloadConfigResponse()
    if error is not None:
        resp.status.error_code = int(error.code)
        resp.status.error_message = error.message
    return resp
