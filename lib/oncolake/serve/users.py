"""Manage the API's users (scripts/users.sh): add, remove, list.

    scripts/users.sh add NAME ROLE      # the password on standard input (twice when it is a terminal)
    scripts/users.sh remove NAME
    scripts/users.sh list

Roles: analyst (reads), clinician (also predicts), operator (everything).
Passwords are stored as Argon2 hashes only; `add` on an existing name
replaces its role and password.
"""
from __future__ import annotations

import getpass
import sys
from typing import Sequence

from oncolake import cli, postgres
from oncolake.errors import InputError
from oncolake.serve import auth


def _password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise InputError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("users", __doc__)
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add a user or replace its role and password (password on stdin)")
    add.add_argument("name")
    add.add_argument("role", choices=auth.ROLES)
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    sub.add_parser("list", help="list the users (never their hashes)")
    args = p.parse_args(argv)
    try:
        cfg = cli.load_config(args)
        with postgres.database(cfg).connect() as conn:
            auth.ensure_schema(conn)
            if args.action == "add":
                created = auth.add_user(conn, args.name, args.role, _password())
                summary = {"job": "users", "action": "add", "name": args.name, "role": args.role,
                           "created": created}
            elif args.action == "remove":
                if not auth.remove_user(conn, args.name):
                    raise InputError(f"no user {args.name!r}")
                summary = {"job": "users", "action": "remove", "name": args.name}
            else:
                users = auth.list_users(conn)
                for user in users:
                    print(f"{user['name']}\t{user['role']}\t{user['created_at']}", flush=True)
                summary = {"job": "users", "action": "list", "users": len(users)}
    except Exception as err:  # every failure ends as one line and an exit code
        return cli.fail("users", err)
    cli.emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
