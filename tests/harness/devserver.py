"""The TF Serving backend for tests: a real ``tensorflow_model_server`` when one is on PATH,
else the DevServer (``python -m tfscache.devserver``)."""

from __future__ import annotations

import os
import shutil
import tempfile

from tests.harness.process import (
    PYTHON,
    REPO_ROOT,
    ManagedProcess,
    ProcessFixture,
    http_ready,
    listen_port,
    tcp_ready,
)

# the DevServer's line once it listens (it is started on port 0 and says what it got)
READY_LINE = r"DevServer ready: gRPC [\d.]+:(\d+), REST [\d.]+:(\d+)"


class DevServer(ProcessFixture):
    """``model_config``: a ModelServerConfig in text format to start with (TF Serving's
    ``--model_config_file``); none by default: tfscache owns the list."""

    def __init__(self, extra_args: tuple[str, ...] = (), model_config: str | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="tfscache-backend-")
        self.real = shutil.which("tensorflow_model_server")
        self.kind = "tensorflow_model_server" if self.real else "devserver"
        self.config = os.path.join(self.dir, "models.config")
        with open(self.config, "w") as f:
            f.write(model_config or "model_config_list {}\n")
        if not self.real and model_config:
            extra_args = ("--model_config_file", self.config, *extra_args)
        self.extra_args = extra_args
        # the DevServer binds port 0 and logs its ports; TF Serving's own server cannot: ports
        # below the ephemeral range for it, retried on a collision (choose_ports)
        self.grpc_port, self.rest_port = (listen_port(), listen_port()) if self.real else (0, 0)
        self.process = ManagedProcess(
            "devserver", self._argv(), ready=self._ready,
            env={"PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"},
            log_dir=self.dir, ports_from_log=None if self.real else READY_LINE,
        )

    def _argv(self) -> list[str]:
        if self.real:
            return [self.real, f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}",
                    f"--model_config_file={self.config}", "--model_config_file_poll_wait_seconds=0",
                    "--file_system_poll_wait_seconds=1", "--max_num_load_retries=0", *self.extra_args]
        return [PYTHON, "-m", "tfscache.devserver", "--port", str(self.grpc_port),
                "--rest_api_port", str(self.rest_port), "--file_system_poll_wait_seconds", "1",
                *self.extra_args]

    def _ready(self) -> bool:
        if self.process.ports:
            self.grpc_port, self.rest_port = self.process.ports
            # a restart binds the same ports again: its node knows them
            self.process.argv, self.process.ports_from_log = self._argv(), None
        return tcp_ready(self.grpc_port)() and http_ready(self.rest_url + "/v1/models/__probe__", accept=(404,))()

    def choose_ports(self) -> bool:
        if not self.real:
            return False
        self.grpc_port, self.rest_port = listen_port(), listen_port()
        self.process.argv = self._argv()
        return True

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def start(self, timeout: float = 90.0) -> DevServer:  # TensorFlow takes a few seconds to import
        return super().start(timeout)  # type: ignore[no-any-return]
