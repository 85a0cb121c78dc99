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
    free_port,
    http_ready,
    tcp_ready,
)


class DevServer(ProcessFixture):
    """``model_config``: a ModelServerConfig in text format to start with (TF Serving's
    ``--model_config_file``); none by default: tfscache owns the list."""

    def __init__(self, extra_args: tuple[str, ...] = (), model_config: str | None = None) -> None:
        self.grpc_port, self.rest_port = free_port(), free_port()
        self.dir = tempfile.mkdtemp(prefix="tfscache-backend-")
        real = shutil.which("tensorflow_model_server")
        self.kind = "tensorflow_model_server" if real else "devserver"
        config = os.path.join(self.dir, "models.config")
        with open(config, "w") as f:
            f.write(model_config or "model_config_list {}\n")
        if not real and model_config:
            extra_args = ("--model_config_file", config, *extra_args)
        if real:
            argv = [real, f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}",
                    f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0",
                    "--file_system_poll_wait_seconds=1", "--max_num_load_retries=0", *extra_args]
        else:
            argv = [PYTHON, "-m", "tfscache.devserver", "--port", str(self.grpc_port),
                    "--rest_api_port", str(self.rest_port), "--file_system_poll_wait_seconds", "1",
                    *extra_args]
        self.process = ManagedProcess(
            "devserver", argv,
            ready=lambda: tcp_ready(self.grpc_port)() and http_ready(
                self.rest_url + "/v1/models/__probe__", accept=(404,))(),
            env={"PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"},
            log_dir=self.dir,
        )

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def start(self, timeout: float = 90.0) -> DevServer:  # TensorFlow takes a few seconds to import
        return super().start(timeout)  # type: ignore[no-any-return]
