#!/usr/bin/env python3
"""Container health probe for the cdtrain HTTP roles (standard library only).

    python /usr/local/bin/cdtrain-healthcheck [/healthz|/readyz]

GETs http://127.0.0.1:$CDTRAIN_PORT<path> (port 8080 when unset) and exits 0 on a 2xx answer, 1
otherwise, printing why. Used by the ingress image's HEALTHCHECK and by deploy/compose.yaml. The
process must listen on 127.0.0.1 too, which CDTRAIN_HOST=0.0.0.0 (the images' default) does.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    port = os.environ.get("CDTRAIN_PORT") or "8080"
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 - fixed local URL
            status = response.status
    except urllib.error.HTTPError as exc:  # 4xx/5xx, e.g. /readyz answering 503
        status = exc.code
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if 200 <= status < 300:
        return 0
    print(f"unhealthy: {url} answered {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
