"""Run the API and web page: ``scripts/serve.sh [--port 8000] [--lake LAKE] [--env ENV] [--set K=V]``.

Listens on 127.0.0.1 unless --host says otherwise (put a TLS-terminating
proxy in front of anything else). Refuses to start without a signing key
(serve.jwt_key_file / ONCOLAKE_JWT_KEY_FILE) or a reachable database.
"""
from __future__ import annotations

import sys
from typing import Sequence

from oncolake import cli, postgres


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("serve", __doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    try:
        cfg = cli.load_config(args)
        from oncolake.serve import app as api
        from oncolake.serve import auth
        application = api.create_app(cfg)
        with postgres.database(cfg).connect() as conn:  # fail now, not at the first request
            auth.ensure_schema(conn)
    except Exception as err:  # every failure ends as one line and an exit code
        return cli.fail("serve", err)
    import uvicorn
    cli.log.info("serving on http://%s:%d (docs at /docs)", args.host, args.port)
    uvicorn.run(application, host=args.host, port=args.port, log_level="info", server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
