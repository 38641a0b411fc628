"""A webhook receiver for the integration tests: a real HTTP server on
loopback that appends every request it gets to a JSON Lines file and
answers 200 (or the status named by a `/status/NNN` path)."""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with open(self.server.log, "a", encoding="utf-8") as f:
            f.write(json.dumps({
                "method": "POST",
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("utf-8", "replace"),
            }) + "\n")
        status = 200
        if self.path.startswith("/status/"):
            status = int(self.path.split("/")[2])
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    port, log = int(sys.argv[1]), sys.argv[2]
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.log = log
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
