"""The twistd application: options and the service maker behind ``twistd tfscache``."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from tfscache.config import ConfigError, load_config_file


class Options(usage.Options):
    synopsis = "--config FILE"
    optParameters = [["config", "c", None, "Path to the YAML configuration file (required)."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")


def makeService(options: Options) -> IService:
    try:
        cfg = load_config_file(options["config"])
    except ConfigError as e:
        # one clear line, no traceback: twistd prints a SystemExit's message and exits 1
        print(f"tfscache: configuration error: {e}", file=sys.stderr)
        raise SystemExit(1)
    from tfscache.reactor import ensure_installed

    try:
        ensure_installed()
    except RuntimeError as e:
        print(f"tfscache: {e}", file=sys.stderr)
        raise SystemExit(1)
    from twisted.internet import reactor

    from tfscache.logs import DaemonLog, log_stream
    from tfscache.service import NodeService

    # twistd's own options (options.parent): where its observer would have written
    out = log_stream(options.parent)
    daemon_log = (DaemonLog(cfg.logging.level, cfg.logging.format, out, clock=reactor,
                            repeat_interval=cfg.logging.repeat_interval_seconds) if out is not None else None)
    return NodeService(cfg, reactor, config_path=options["config"], daemon=True, daemon_log=daemon_log)
