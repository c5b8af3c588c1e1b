"""A PACS worker: find the radiographs an Orthanc server holds without a Bone-R result, analyse each, store the
results (`bone_r.dicom_results`: an annotated image and an SR) back into the same study.

`run_once(orthanc, analyse, identity)` walks the server's series (Orthanc's REST API): series of a radiograph
modality (CR, DX, DR) are looked at instance by instance, every other series is skipped with its reason (once per
series; Bone-R's own result series silently). An instance is done when its SR's UID is on the server: the UIDs of
the results are derived from the source instance, the model, the mode and the threshold (`result_uids`), so that is
one lookup, made before anything is downloaded. Otherwise the file is fetched, `analyse(data)` decodes and predicts
(raising `Skip` for a file it cannot read), and the overlay then the SR are stored: an SR on the server means a
complete result, and a run stopped between the two stores the same overlay again (Orthanc answers "AlreadyStored").
So a second run adds nothing, and a stopped run resumes where it was. One log line per instance.

Credentials come from the environment (`credentials_from_env`: BONE_R_PACS_USER, BONE_R_PACS_PASSWORD) and are
never logged. Imports nothing else of the project but `bone_r.dicom_results`.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bone_r import dicom_results

log = logging.getLogger("boner.pacs")

RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
USER_ENV, PASSWORD_ENV = "BONE_R_PACS_USER", "BONE_R_PACS_PASSWORD"
OWN_SERIES = {dicom_results.SR_SERIES_DESCRIPTION, dicom_results.OVERLAY_SERIES_DESCRIPTION}


class PacsError(RuntimeError):
    """The server cannot be used (unreachable, refused the credentials, answered nonsense): the run stops."""


class Skip(Exception):  # noqa: N818 - not an error: an instance left alone, with its reason
    """`analyse` cannot analyse this file (undecodable, not an image): the instance is skipped with `str(reason)`."""


def credentials_from_env(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) from BONE_R_PACS_USER / BONE_R_PACS_PASSWORD, or None when no user is set."""
    environ = os.environ if environ is None else environ
    user = environ.get(USER_ENV, "")
    return (user, environ.get(PASSWORD_ENV, "")) if user else None


class Orthanc:
    """The few calls of Orthanc's REST API the worker makes."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, timeout_s: float = 60.0):
        import requests

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError(f"--url must be an http(s) URL of an Orthanc server, got {url!r}")
        if parts.username or parts.password:
            raise PacsError(f"put the credentials in {USER_ENV} and {PASSWORD_ENV}, not in the URL")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.auth = auth
        self.session.trust_env = False  # no proxy or .netrc credentials from elsewhere

    def __repr__(self) -> str:  # never the credentials
        return f"Orthanc({self.url!r})"

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        import requests

        try:
            response = self.session.request(method, f"{self.url}{path}", timeout=self.timeout_s, **kw)
        except requests.RequestException as err:
            raise PacsError(f"cannot reach Orthanc at {self.url} ({type(err).__name__})") from None
        if response.status_code == 401:
            raise PacsError(f"Orthanc at {self.url} refused the credentials (HTTP 401); set {USER_ENV} and {PASSWORD_ENV}")
        if response.status_code >= 400:
            raise PacsError(f"Orthanc answered HTTP {response.status_code} to {method} {path}: {response.text[:200]}")
        return response

    def get_json(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params=params or None).json()

    def get_file(self, instance: str) -> bytes:
        return self._request("GET", f"/instances/{instance}/file").content

    def system(self) -> dict[str, Any]:
        return self.get_json("/system")

    def series(self, page: int = 100) -> Iterator[dict[str, Any]]:
        """Every series, with its tags and instances (`/series?expand`, a page at a time)."""
        since = 0
        while True:
            batch = self.get_json("/series", expand="", since=since, limit=page)
            yield from batch
            if len(batch) < page:
                return
            since += page

    def instances(self, series: str) -> list[dict[str, Any]]:
        return self.get_json(f"/series/{series}/instances")

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        return self._request("POST", "/tools/lookup", data=uid).json()

    def store(self, data: bytes) -> dict[str, Any]:
        return self._request("POST", "/instances", data=data, headers={"Content-Type": "application/dicom"}).json()


# analyse(data) -> (record, display): the prediction as plain data and the image as shown (uint8), see dicom_results
Analyse = Callable[[bytes], tuple[dict[str, Any], np.ndarray]]


@dataclass
class Counts:
    stored: int = 0
    done: int = 0  # already had a result
    skipped: int = 0
    failed: int = 0
    seen: set[str] = field(default_factory=set)  # instances (and skipped series) handled by this process

    def __str__(self) -> str:
        return f"{self.stored} analysed and stored, {self.done} already done, {self.skipped} skipped, {self.failed} failed"


def run_once(orthanc: Orthanc, analyse: Analyse, identity: dict[str, Any],
             modalities: tuple[str, ...] = RADIOGRAPH_MODALITIES, counts: Counts | None = None) -> Counts:
    """One pass over the server. `identity` is what names a result before it exists: ``model``
    ({"name", "version"}), ``mode`` and ``threshold`` (see `dicom_results.result_uids`). `counts` carries over
    between passes (`watch`): instances and series it has seen are not looked at again."""
    counts = counts if counts is not None else Counts()
    studies: dict[str, str] = {}
    for series in orthanc.series():
        sid = series["ID"]
        if sid in counts.seen:
            continue
        tags = series.get("MainDicomTags", {})
        modality = str(tags.get("Modality", "")).strip().upper()
        if modality not in modalities:
            counts.seen.add(sid)
            if tags.get("SeriesDescription") not in OWN_SERIES:
                counts.skipped += 1
                log.info("skipped series %s (%s, %d instance(s)): modality %s is not a radiograph (%s)", sid,
                         tags.get("SeriesDescription") or "no description", len(series.get("Instances", [])),
                         modality or "missing", "/".join(modalities))
            continue
        study = series["ParentStudy"]
        if study not in studies:
            studies[study] = orthanc.get_json(f"/studies/{study}")["MainDicomTags"].get("StudyInstanceUID", "")
        for instance in orthanc.instances(sid):
            if instance["ID"] not in counts.seen:
                _handle(orthanc, analyse, identity, modality, study, studies[study], instance, counts)
    return counts


def _handle(orthanc: Orthanc, analyse: Analyse, identity: dict[str, Any], modality: str, study: str, study_uid: str,
            instance: dict[str, Any], counts: Counts) -> None:
    iid = instance["ID"]
    sop_uid = instance.get("MainDicomTags", {}).get("SOPInstanceUID", "")
    where = f"instance {iid} ({modality})"
    uids = dicom_results.result_uids(study_uid, sop_uid, identity)
    if orthanc.lookup(uids.sr):
        counts.done += 1
        counts.seen.add(iid)
        log.info("done    %s: its Bone-R result is already stored", where)
        return
    t0 = time.perf_counter()
    try:
        data = orthanc.get_file(iid)
        record, display = analyse(data)
        source = dicom_results.read_header(data)
        if str(source.get("StudyInstanceUID", "")) != study_uid or str(source.get("SOPInstanceUID", "")) != sop_uid:
            raise Skip("its file's UIDs differ from what the server indexed")
        results = dicom_results.build_results(source, record, display)
    except Skip as err:
        counts.skipped += 1
        counts.seen.add(iid)
        log.info("skipped %s: %s", where, err)
        return
    except ValueError as err:  # the source lacks what a result needs (dicom_results says what)
        counts.skipped += 1
        counts.seen.add(iid)
        log.info("skipped %s: %s", where, err)
        return
    except PacsError:
        raise
    except Exception as err:  # noqa: BLE001 - one odd file must not stop the others; the run exits 1
        counts.failed += 1
        log.exception("failed  %s: its results could not be made (%s: %s)", where, type(err).__name__, err)
        return
    stored = [orthanc.store(dicom_results.to_bytes(ds)) for ds in results]  # the overlay, then the SR: see above
    wrong = [s.get("ParentStudy") for s in stored if s.get("ParentStudy") != study]
    if wrong:
        counts.failed += 1
        log.error("failed  %s: a result landed in study %s, not %s", where, wrong[0], study)
        return
    counts.stored += 1
    counts.seen.add(iid)
    found = sum(1 for d in record.get("detections", []) if d["score"] >= record["threshold"])
    verdict = f"fracture suspected ({found} box(es))" if found else "no finding above threshold"
    log.info("stored  %s: %s, %s mode; overlay %s, SR %s (%.1f s)", where, verdict, record.get("mode"),
             stored[0].get("ID"), stored[1].get("ID"), time.perf_counter() - t0)


def watch(orthanc: Orthanc, analyse: Analyse, identity: dict[str, Any], interval_s: float = 30.0,
          modalities: tuple[str, ...] = RADIOGRAPH_MODALITIES, passes: int | None = None) -> Counts:
    """`run_once` every `interval_s` until interrupted (or `passes` passes); a server that is down for a while is
    waited for (logged), not fatal."""
    counts = Counts()
    n = 0
    while passes is None or n < passes:
        n += 1
        try:
            run_once(orthanc, analyse, identity, modalities, counts)
        except PacsError as err:
            log.warning("pass %d: %s; trying again in %g s", n, err, interval_s)
        if passes is None or n < passes:
            time.sleep(interval_s)
    return counts
