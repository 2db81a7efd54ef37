"""A small web site on loopback for the Scrapy add-on's tests and benchmark (tests/scrapy_project).

    with SiteServer() as site:
        site.url("/t/7/0")          # the root of job tree 7

Pages:
- /t/<n>/<i>: a tree of TREE_PAGES pages per job: 0 links to 1 and 2; 1 to 3
  and back to 0; 2 to 3 and /shared; 3 to 0. Each page is one item, so a job
  of /t/<n>/0 yields exactly TREE_PAGES items when duplicates are filtered
  per job (every job visits /shared).
- /shared: linked from every tree; links to itself.
- /fan/<n>?k=K: links to K held pages /held/<n>/<i>; /drain/<n>: to 3 of them.
- /held/...: answers once `release` is set (cancel and drain tests).
- /status/<code>: that status; 429 and 503 carry `Retry-After: 30`.
- /redirect/<n>: 302 to /t/<n>/0.
- /private/...: disallowed by /robots.txt (User-agent: *, Disallow: /private/).
- /b/<i>: one page without links (the benchmark).

`hits` counts the requests per path; `paths(prefix)` lists them; `times`
holds (monotonic time, path) of every request.
"""

from __future__ import annotations

import collections
import http.server
import threading
import time
from urllib.parse import parse_qs, urlsplit

TREE_PAGES = 5
ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"
TREE_LINKS = {"0": ["1", "2"], "1": ["3", "0"], "2": ["3", "/shared"], "3": ["0"]}


class SiteServer:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.hits: collections.Counter[str] = collections.Counter()
        self.times: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real site

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = urlsplit(self.path).path
                with site.lock:
                    site.hits[path] += 1
                    site.times.append((time.monotonic(), path))
                status, headers, body = site.page(self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="scrapy-site", daemon=True)

    def __enter__(self) -> SiteServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        return self.base + path

    def paths(self, prefix: str) -> list[str]:
        with self.lock:
            return [path for path in self.hits if path.startswith(prefix)]

    def page(self, raw_path: str) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        segments = path.strip("/").split("/")
        html = {"Content-Type": "text/html; charset=utf-8"}
        if path == "/robots.txt":
            return 200, {"Content-Type": "text/plain"}, ROBOTS_TXT.encode()
        if segments[0] == "t" and len(segments) == 3 and segments[2] in TREE_LINKS:
            n = segments[1]
            links = [link if link.startswith("/") else f"/t/{n}/{link}" for link in TREE_LINKS[segments[2]]]
            return 200, html, _html(f"tree {n} page {segments[2]}", links)
        if path == "/shared":
            return 200, html, _html("shared", ["/shared"])
        if segments[0] == "fan" and len(segments) == 2:
            count = int(query.get("k", ["20"])[0])
            return 200, html, _html("fan", [f"/held/{segments[1]}/{i}" for i in range(count)])
        if segments[0] == "drain" and len(segments) == 2:
            return 200, html, _html("drain", [f"/held/{segments[1]}/{i}" for i in range(3)])
        if segments[0] == "held":
            self.release.wait(60)
            return 200, html, _html("held", [])
        if segments[0] == "status" and len(segments) == 2:
            status = int(segments[1])
            headers = {**html, "Retry-After": "30"} if status in (429, 503) else html
            return status, headers, _html(f"status {status}", [])
        if segments[0] == "redirect" and len(segments) == 2:
            return 302, {"Location": f"/t/{segments[1]}/0", "Content-Type": "text/plain"}, b""
        if segments[0] == "private":
            return 200, html, _html("private", [])
        if segments[0] == "b":
            return 200, html, _html(f"bench {segments[-1]}", [], filler=2000)
        if segments[0] == "sleep":
            time.sleep(float(query.get("s", ["1"])[0]))
            return 200, html, _html("slept", [])
        return 404, html, _html("not found", [])


def _html(title: str, links: list[str], filler: int = 0) -> bytes:
    anchors = "".join(f'<a href="{link}">{link}</a> ' for link in links)
    text = "x" * filler
    return f"<html><head><title>{title}</title></head><body>{anchors}<p>{text}</p></body></html>".encode()
