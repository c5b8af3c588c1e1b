"""The nearby-clinics lookup against a local fake Places server (no test touches the internet)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from app import places

SECRET = "AIzaFAKE-secret-key-0123456789"


def _place(i: int) -> dict:
    return {
        "name": f"Ortho Clinic {i}",
        "vicinity": f"{i} Bone Street",
        "rating": 4.0 + i / 10,
        "place_id": f"pid{i}",
        "geometry": {"location": {"lat": 48.1 + i / 100, "lng": 11.5 + i / 100}},
    }


class FakePlaces:
    """A Places Nearby Search look-alike on 127.0.0.1; `behaviour` picks the answer."""

    def __init__(self):
        self.behaviour = "ok"
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                url = urlparse(self.path)
                fake.requests.append({"path": url.path, "query": parse_qs(url.query)})
                behaviour = fake.behaviour
                if behaviour == "timeout":
                    time.sleep(1.5)
                    return self._json(200, {"status": "OK", "results": []})
                if behaviour == "http500":
                    return self._json(500, {"error": "boom"})
                if behaviour == "notjson":
                    return self._raw(200, b"<html>not json</html>")
                if behaviour == "denied":
                    # Google's real messages can quote the request; echo the key and a URL on purpose.
                    key = parse_qs(url.query).get("key", [""])[0]
                    return self._json(200, {"status": "REQUEST_DENIED", "results": [],
                                            "error_message": f"The provided API key is invalid: {key} "
                                                             f"(https://maps.example/api?key={key})"})
                if behaviour == "zero":
                    return self._json(200, {"status": "ZERO_RESULTS", "results": []})
                if behaviour == "echo":
                    # A result and a response header that quote the request URL, key included.
                    echoed = f"http://{self.headers['Host']}{self.path}"
                    place = _place(0) | {"name": f"Clinic at {echoed}", "vicinity": f"see {self.path}",
                                         "place_id": f"pid?{url.query}"}
                    return self._json(200, {"status": "OK", "results": [place]}, {"X-Echo": self.path})
                results = [_place(i) for i in range(8)] + ["junk", {"no": "name"}]
                return self._json(200, {"status": "OK", "results": results})

            def _json(self, status, body, headers=None):
                self._raw(status, json.dumps(body).encode(), "application/json", headers)

            def _raw(self, status, data, ctype="text/html", headers=None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout case)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/maps/api/place"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_places():
    with FakePlaces() as fake:
        yield fake


def lookup(fake: FakePlaces, timeout_s: float = 2.0, key: str = SECRET) -> dict:
    return asyncio.run(places.find_nearby_clinics(48.137, 11.575, api_key=key, base_url=fake.base_url, timeout_s=timeout_s))


def test_success_returns_at_most_five_well_formed_clinics(fake_places):
    out = lookup(fake_places)
    assert out["available"] is True
    assert len(out["results"]) == 5
    first = out["results"][0]
    assert first["name"] == "Ortho Clinic 0"
    assert first["address"] == "0 Bone Street"
    assert first["rating"] == pytest.approx(4.0)
    assert first["location"] == {"lat": pytest.approx(48.1), "lng": pytest.approx(11.5)}
    assert first["maps_url"].startswith("https://www.google.com/maps/search/?api=1")
    assert "query_place_id=pid0" in first["maps_url"]
    assert SECRET not in json.dumps(out)
    # the request the fake received: the right endpoint, location, keyword and key
    (req,) = fake_places.requests
    assert req["path"] == "/maps/api/place/nearbysearch/json"
    assert req["query"]["location"] == ["48.137000,11.575000"]
    assert req["query"]["keyword"] == ["orthopedic"]
    assert req["query"]["key"] == [SECRET]


def test_zero_results_is_available_but_empty(fake_places):
    fake_places.behaviour = "zero"
    out = lookup(fake_places)
    assert out["available"] is True and out["results"] == []


def test_timeout_gives_a_reason_not_an_exception(fake_places):
    fake_places.behaviour = "timeout"
    t0 = time.perf_counter()
    out = lookup(fake_places, timeout_s=0.3)
    assert time.perf_counter() - t0 < 1.2  # the lookup gave up on time, it did not wait for the server
    assert out == {"available": False, "reason": "the Places service did not answer within 0.3 s"}


@pytest.mark.parametrize("behaviour, words", [("http500", "HTTP 500"), ("notjson", "not valid JSON")])
def test_bad_answers_give_reasons(fake_places, behaviour, words):
    fake_places.behaviour = behaviour
    out = lookup(fake_places)
    assert out["available"] is False
    assert words in out["reason"]


def test_request_denied_never_leaks_the_key_in_reason_or_logs(fake_places, caplog):
    fake_places.behaviour = "denied"
    caplog.set_level(logging.DEBUG)
    out = lookup(fake_places)
    assert out["available"] is False
    assert "REQUEST_DENIED" in out["reason"]
    text = json.dumps(out)
    assert SECRET not in text and "http" not in out["reason"].lower()
    assert fake_places.requests[0]["query"]["key"] == [SECRET]  # it was sent, so the logs had a chance to show it
    assert caplog.records, "the HTTP client should have logged the request"
    assert SECRET not in caplog.text
    assert "key=[redacted]" in caplog.text


def test_results_and_child_loggers_never_leak_the_key(fake_places, caplog):
    """A result that echoes the request URL is scrubbed; httpcore.http11 logs the echoing header at DEBUG."""
    fake_places.behaviour = "echo"
    caplog.set_level(logging.DEBUG)
    out = lookup(fake_places)
    assert out["available"] is True and len(out["results"]) == 1
    assert SECRET not in json.dumps(out) and "key=[redacted]" in out["results"][0]["address"]
    assert out["results"][0]["name"].startswith("Clinic at")
    assert any(r.name == "httpcore.http11" for r in caplog.records), "httpcore's child logger should have logged"
    assert "X-Echo" in caplog.text  # the header was logged ...
    assert SECRET not in caplog.text  # ... without the key
    assert SECRET not in "".join(logging.Formatter().format(r) for r in caplog.records)


def test_unreachable_server_gives_a_reason():
    with FakePlaces() as fake:
        url = fake.base_url
    out = asyncio.run(places.find_nearby_clinics(1.0, 2.0, api_key=SECRET, base_url=url, timeout_s=1.0))
    assert out["available"] is False
    assert "could not be reached" in out["reason"] or "did not answer" in out["reason"]
    assert SECRET not in json.dumps(out) and "127.0.0.1" not in out["reason"]


def test_no_key_means_no_request(fake_places):
    out = lookup(fake_places, key="")
    assert out["available"] is False and "not configured" in out["reason"]
    assert fake_places.requests == []


def test_scrub_removes_key_and_urls():
    text = places.scrub(f"bad {SECRET} at https://x.test/p?key={SECRET}&a=1 and key=abc", SECRET)
    assert SECRET not in text and "https://" not in text and "key=abc" not in text
