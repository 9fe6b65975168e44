#!/usr/bin/env python3
"""A minimal client of the vgpu-scheduler REST API on its Unix socket (standard library only).

Usage: api.py SOCKET METHOD PATH [JSON_BODY] [--field NAME]

Prints the response body (or, with --field, that member of the JSON object) on stdout and
the status line on stderr. Exit status: 0 for a 2xx answer, 1 for another answer, 2 when the
socket could not be reached or the answer was unreadable.
"""
import http.client
import json
import socket
import sys


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def main(argv):
    args = list(argv[1:])
    field = None
    if "--field" in args:
        i = args.index("--field")
        field = args[i + 1]
        del args[i : i + 2]
    if len(args) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, method, url = args[0], args[1], args[2]
    body = args[3] if len(args) > 3 else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    try:
        conn = UnixConnection(path, timeout=10)
        conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as e:
        print(f"{method} {url}: {e}", file=sys.stderr)
        return 2
    print(f"{method} {url}: {resp.status} {resp.reason}", file=sys.stderr)
    if field is None:
        print(data)
    else:
        try:
            value = json.loads(data).get(field)
        except (ValueError, AttributeError):
            value = None
        print("" if value is None else value)
    return 0 if 200 <= resp.status < 300 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
