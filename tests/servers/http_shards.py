"""Python's http.server over a folder, plus the faults a remote shard store shows, by path
prefix (the rest of the path is the file served):

    /403/...   answers 403 Forbidden
    /cut/...   sends the full Content-Length, then half the bytes, then closes (a truncated read)

    python tests/servers/http_shards.py DIR PORT     (binds 127.0.0.1; the tests start it)
"""

from __future__ import annotations

import functools
import http.server
import os
import sys


class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/403/"):
            self.send_error(403, "Forbidden")
            return
        if self.path.startswith("/cut/"):
            path = self.translate_path(self.path[len("/cut") :])
            if not os.path.isfile(path):
                self.send_error(404)
                return
            with open(path, "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


def main() -> None:
    root, port = sys.argv[1], int(sys.argv[2])
    handler = functools.partial(Handler, directory=root)
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        print(f"serving {root} on 127.0.0.1:{port}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
