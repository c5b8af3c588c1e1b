"""Nearby orthopedic clinics from the Google Places Nearby Search API (optional).

Only the service calls this, and only when something was detected, an API key is
configured and the caller sent a location. Every failure comes back as
``{"available": False, "reason": ...}``; a reason is written by this module (never
copied from an exception, which may hold the request URL) and is scrubbed of the
key and of URLs before it leaves, and so are the names and addresses of results.
The key travels in the query string, as the Places API requires, so every log
record of the process is redacted (see `install_log_redaction`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import urlencode

import httpx

from bone_r.runs import finite_float

DEFAULT_BASE_URL = "https://maps.googleapis.com/maps/api/place"
MAX_RESULTS = 5
MAPS_SEARCH_URL = "https://www.google.com/maps/search/"
ATTRIBUTION = "Listings from Google Places; not a referral or endorsement."

log = logging.getLogger("boner.places")

_KEY_IN_QUERY = re.compile(r"(?i)(key=)[^&\s\"'>]+")
_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://\S+")


def _redact(record: logging.LogRecord) -> None:
    """Rewrite `record` so that no `key=` value survives in its message."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken record is not ours to fix
        return
    if "key=" in message.lower():
        record.msg = _KEY_IN_QUERY.sub(r"\1[redacted]", message)
        record.args = ()


def install_log_redaction() -> None:
    """Redact `key=` values in every log record of the process (idempotent).

    Done in the record factory, not as a logger filter: a filter on "httpcore" never sees the records of
    its children ("httpcore.http11" logs response headers at DEBUG), and any logger may quote a URL.
    """
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "redacts_keys", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        _redact(record)
        return record

    redacting_factory.redacts_keys = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)


def scrub(text: str, api_key: str | None) -> str:
    """`text` without the key, any `key=` value and any URL (the last guard on every reason)."""
    if api_key:
        text = text.replace(api_key, "[redacted]")
    text = _KEY_IN_QUERY.sub(r"\1[redacted]", text)
    return _URL.sub("[url]", text)


def unavailable(reason: str, api_key: str | None = None) -> dict[str, Any]:
    return {"available": False, "reason": scrub(reason, api_key)}


def maps_link(name: str, lat: float | None, lng: float | None, place_id: str | None) -> str:
    """A Google Maps search link for one place (no key in it)."""
    query = f"{lat},{lng}" if lat is not None and lng is not None else name
    params = {"api": "1", "query": query}
    if place_id:
        params["query_place_id"] = place_id
    return f"{MAPS_SEARCH_URL}?{urlencode(params)}"


def parse_results(results: Any, max_results: int = MAX_RESULTS, api_key: str | None = None) -> list[dict[str, Any]]:
    """The first `max_results` well-formed places: name, address, rating, location, maps link.

    Names and addresses are scrubbed like reasons: a result may echo the request URL, key included.
    """
    clinics: list[dict[str, Any]] = []
    if not isinstance(results, list):
        return clinics
    for item in results:
        if len(clinics) >= max_results:
            break
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        location = (item.get("geometry") or {}).get("location") if isinstance(item.get("geometry"), dict) else None
        lat = finite_float(location.get("lat")) if isinstance(location, dict) else None
        lng = finite_float(location.get("lng")) if isinstance(location, dict) else None
        name = scrub(item["name"], api_key)[:200]
        address = scrub(str(item.get("vicinity") or item.get("formatted_address") or ""), api_key)[:300]
        place_id = item.get("place_id") if isinstance(item.get("place_id"), str) else None
        if place_id and scrub(place_id, api_key) != place_id:  # it goes into the maps link: drop it rather than mangle it
            place_id = None
        rating = finite_float(item.get("rating"))
        clinics.append({
            "name": name,
            "address": address,
            "rating": rating,
            "location": {"lat": lat, "lng": lng} if lat is not None and lng is not None else None,
            "maps_url": maps_link(name, lat, lng, place_id),
        })
    return clinics


async def find_nearby_clinics(
    lat: float,
    lng: float,
    *,
    api_key: str,
    base_url: str = DEFAULT_BASE_URL,
    timeout_s: float = 5.0,
    radius_m: int = 10_000,
    max_results: int = MAX_RESULTS,
) -> dict[str, Any]:
    """Up to `max_results` orthopedic clinics near (lat, lng), or ``{available: False, reason}``."""
    if not api_key:
        return unavailable("the clinics lookup is not configured on this server (no Maps API key)")
    install_log_redaction()
    url = base_url.rstrip("/") + "/nearbysearch/json"
    params = {
        "location": f"{lat:.6f},{lng:.6f}",
        "radius": str(int(radius_m)),
        "keyword": "orthopedic",
        "type": "doctor",
        "key": api_key,
    }
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), follow_redirects=False) as client:
            # wait_for bounds the whole exchange, also against a server that drips bytes.
            response = await asyncio.wait_for(client.get(url, params=params), timeout=timeout_s)
    except (TimeoutError, httpx.TimeoutException):
        log.warning("Places lookup timed out after %.1f s", timeout_s)
        return unavailable(f"the Places service did not answer within {timeout_s:g} s", api_key)
    except httpx.HTTPError as err:
        log.warning("Places lookup failed: %s", type(err).__name__)
        return unavailable(f"the Places service could not be reached ({type(err).__name__})", api_key)
    if response.status_code != 200:
        log.warning("Places lookup answered HTTP %d", response.status_code)
        return unavailable(f"the Places service answered HTTP {response.status_code}", api_key)
    try:
        body = response.json()
    except ValueError:
        return unavailable("the Places service's answer was not valid JSON", api_key)
    if not isinstance(body, dict):
        return unavailable("the Places service's answer was not a JSON object", api_key)
    status = body.get("status")
    if status == "ZERO_RESULTS":
        return {"available": True, "source": "Google Places", "results": [], "attribution": ATTRIBUTION}
    if status != "OK":
        # Google's error_message may quote the request; only the status word goes out.
        shown = status if isinstance(status, str) and re.fullmatch(r"[A-Z_]{1,40}", status) else "missing or unknown"
        log.warning("Places lookup answered status %s", shown)
        return unavailable(f"the Places service refused the lookup (status {shown})", api_key)
    return {
        "available": True,
        "source": "Google Places",
        "results": parse_results(body.get("results"), max_results, api_key),
        "attribution": ATTRIBUTION,
    }
