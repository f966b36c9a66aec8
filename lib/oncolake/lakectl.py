"""Operator commands on a lake in HDFS, over WebHDFS (the ``hdfs`` package).

No Spark and no Hadoop client: what an operator needs to list, upload and
size the lake from any machine that reaches the NameNode's HTTP port.

    scripts/lake.sh ls  [-R] PATH         entries with type, size and time
    scripts/lake.sh put LOCAL PATH        upload a file or folder (refuses to overwrite)
    scripts/lake.sh get PATH LOCAL        download a file or folder
    scripts/lake.sh du  PATH              bytes, files and folders under each entry
    scripts/lake.sh tables [LAKE]         the Delta tables under a lake, with their versions

PATH is ``/abs/path`` or ``hdfs://host:port/abs/path``. The WebHDFS address
and user come from the configuration (``hdfs.webhdfs_url``, ``hdfs.user``,
``ONCOLAKE_WEBHDFS_URL``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Any, Iterator
from urllib.parse import urlparse

from oncolake import cli, config
from oncolake.errors import InputError

log = logging.getLogger(__name__)

_DELTA_COMMIT = re.compile(r"^(\d{20})\.json$")


def client(cfg: config.Config):
    """An ``hdfs.InsecureClient`` for the configured WebHDFS address and user."""
    import hdfs
    return hdfs.InsecureClient(cfg.hdfs.webhdfs_url, user=cfg.hdfs.user or None)


def hdfs_path(uri: str) -> str:
    """The absolute HDFS path of ``hdfs://host:port/p`` or ``/p``."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "hdfs") or not parsed.path.startswith("/"):
        raise InputError(f"not an HDFS path: {uri!r} (use /abs/path or hdfs://host:port/abs/path)")
    return parsed.path.rstrip("/") or "/"


def ls(hdfs_client, path: str, recursive: bool = False) -> Iterator[dict[str, Any]]:
    """Entries under ``path`` (the path itself if it is a file)."""
    status = hdfs_client.status(path, strict=False)
    if status is None:
        raise InputError(f"{path} does not exist")
    if status["type"] == "FILE":
        yield _entry(path, status)
        return
    for name, child in hdfs_client.list(path, status=True):
        full = f"{path.rstrip('/')}/{name}"
        yield _entry(full, child)
        if recursive and child["type"] == "DIRECTORY":
            yield from ls(hdfs_client, full, recursive=True)


def du(hdfs_client, path: str) -> list[dict[str, Any]]:
    """Bytes, files and folders under each entry of ``path`` (and the total)."""
    rows = []
    for entry in ls(hdfs_client, path):
        summary = hdfs_client.content(entry["path"])
        rows.append({"path": entry["path"], "bytes": summary["length"], "files": summary["fileCount"],
                     "dirs": summary["directoryCount"]})
    total = hdfs_client.content(path)
    rows.append({"path": f"{path} (total)", "bytes": total["length"], "files": total["fileCount"],
                 "dirs": total["directoryCount"]})
    return rows


def tables(hdfs_client, lake: str) -> list[dict[str, Any]]:
    """Every Delta table under ``lake`` (a folder holding ``_delta_log``) with its latest version."""
    found = []
    for root, dirs, files in hdfs_client.walk(lake):
        if "_delta_log" in dirs:
            commits = [int(m.group(1)) for f in hdfs_client.list(f"{root}/_delta_log")
                       if (m := _DELTA_COMMIT.match(f))]
            content = hdfs_client.content(root)
            found.append({"table": root, "version": max(commits) if commits else None,
                          "bytes": content["length"], "files": content["fileCount"]})
            dirs[:] = []  # a table's partitions are not tables
        else:
            dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
    return found


def _entry(path: str, status: dict[str, Any]) -> dict[str, Any]:
    return {"path": path, "type": "dir" if status["type"] == "DIRECTORY" else "file",
            "bytes": status["length"],
            "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(status["modificationTime"] / 1000))}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lake.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="local", help="configuration layer conf/<env>.yaml (default: local)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--conf-dir")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    sub = p.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("ls")
    cmd.add_argument("-R", dest="recursive", action="store_true")
    cmd.add_argument("path")
    cmd = sub.add_parser("put")
    cmd.add_argument("--threads", type=int, default=8, help="files uploaded at once (each is two HTTP requests)")
    cmd.add_argument("local")
    cmd.add_argument("path")
    cmd = sub.add_parser("get")
    cmd.add_argument("path")
    cmd.add_argument("local")
    cmd = sub.add_parser("du")
    cmd.add_argument("path")
    cmd = sub.add_parser("tables")
    cmd.add_argument("lake", nargs="?")
    return p


def main(argv: list[str] | None = None) -> int:
    """``scripts/lake.sh``: exit 0 done, 1 failed, 2 usage."""
    args = _parser().parse_args(argv)
    cli.setup_logging()
    try:
        cfg = config.load(args.env, overrides=args.set, environ=os.environ, conf_dir=args.conf_dir)
        hdfs_client = client(cfg)
        if args.command == "ls":
            rows = list(ls(hdfs_client, hdfs_path(args.path), args.recursive))
        elif args.command == "du":
            rows = du(hdfs_client, hdfs_path(args.path))
        elif args.command == "tables":
            rows = tables(hdfs_client, hdfs_path(args.lake or cfg.lake))
        elif args.command == "put":
            if not os.path.exists(args.local):
                raise InputError(f"{args.local} does not exist")
            target = hdfs_client.upload(hdfs_path(args.path), args.local, n_threads=args.threads)
            rows = [{"uploaded": args.local, "to": target}]
        else:
            target = hdfs_client.download(hdfs_path(args.path), args.local, n_threads=2)
            rows = [{"downloaded": args.path, "to": target}]
    except Exception as err:  # one line and an exit code, as the jobs do
        return cli.fail(f"lake.sh {args.command}", err)
    for row in rows:
        print(json.dumps(row) if args.json else "\t".join(str(v) for v in row.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
