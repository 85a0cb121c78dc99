"""``tfscache``: the admin API for humans.

    tfscache [--url http://127.0.0.1:8501] [--token T] models
    tfscache owners NAME | members
    tfscache preload NAME [--version V] | pin NAME V | unpin NAME V | evict NAME V

The token may also come from $TFSCACHE_ADMIN_TOKEN (better than the command line)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def _call(args: argparse.Namespace, method: str, path: str) -> Any:
    req = urllib.request.Request(args.url.rstrip("/") + path, method=method, data=b"" if method == "POST" else None)
    token = args.token or os.environ.get("TFSCACHE_ADMIN_TOKEN", "")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise SystemExit(f"tfscache: {e.code}: {message}")
    except urllib.error.URLError as e:
        raise SystemExit(f"tfscache: cannot reach {args.url}: {e.reason}")


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Columns padded to their widest cell; "-" for an empty one (a model without an error)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tfscache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("TFSCACHE_URL", "http://127.0.0.1:8501"))
    ap.add_argument("--token", default=None)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true", help="print the raw JSON answer")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="models this node holds")
    sub.add_parser("members", help="cluster members this node sees")
    p = sub.add_parser("owners", help="which members own a model name")
    p.add_argument("name")
    p = sub.add_parser("preload", help="fetch and load a model now")
    p.add_argument("name")
    p.add_argument("--version", type=int)
    for action in ("pin", "unpin", "evict"):
        p = sub.add_parser(action, help=f"{action} a model version")
        p.add_argument("name")
        p.add_argument("version", type=int)
    args = ap.parse_args(argv)

    if args.command == "models":
        result = _call(args, "GET", "/admin/models")
        if not args.json:
            rows = result["models"]
            for r in rows:
                r["last_used"] = time.strftime("%H:%M:%S", time.localtime(r["last_used"])) if r["last_used"] else "-"
            print(_table(rows, ["name", "version", "state", "size_bytes", "in_flight", "hits", "loads",
                                "pinned", "last_used", "error"]))
            return 0
    elif args.command == "members":
        result = _call(args, "GET", "/admin/members")
        if not args.json:
            print(_table(result["members"], ["id", "host", "rest_port", "grpc_port"]))
            return 0
    elif args.command == "owners":
        result = _call(args, "GET", f"/admin/owners/{_q(args.name)}")
        if not args.json:
            print(_table(result["owners"], ["id", "host", "rest_port", "grpc_port"]))
            return 0
    elif args.command == "preload":
        path = f"/admin/models/{_q(args.name)}" + (f"/versions/{args.version}" if args.version is not None else "")
        result = _call(args, "POST", path + ":preload")
        if result.get("warning"):
            print(f"tfscache: warning: {result['warning']}", file=sys.stderr)
    else:
        result = _call(args, "POST", f"/admin/models/{_q(args.name)}/versions/{args.version}:{args.command}")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
