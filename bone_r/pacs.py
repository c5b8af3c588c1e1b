"""A PACS worker: find the radiographs a PACS holds without a Bone-R result, analyse each, store the results
(`bone_r.dicom_results`: an annotated image and an SR) back into the same study.

The worker (`run_once`, `watch`) talks to the server through a small interface, `Store`, of which there are two:
`Orthanc` (Orthanc's REST API) and `DicomWeb` (any DICOMweb server, through `dicomweb-client`: QIDO-RS to list
series and instances and to look a result up, WADO-RS to fetch an instance, STOW-RS to store the results). Both
find the same results: a result is named by UIDs, not by a server's own IDs, so what one stored the other sees.

`run_once(server, analyse, identity)` walks the server's series: series of a radiograph modality (CR, DX, DR) are
looked at instance by instance, every other series is skipped with its reason (once per series; Bone-R's own
result series silently). An instance is done when its SR's UID is on the server: the UIDs of the results are
derived from the source instance, the model, the mode and the threshold (`result_uids`), so that is one lookup,
made before anything is downloaded. Otherwise the file is fetched, `analyse(data)` decodes and predicts (raising
`Skip` for a file it cannot read), and the overlay then the SR are stored: an SR on the server means a complete
result, and a run stopped between the two stores the same overlay again (Orthanc answers "AlreadyStored", a STOW-RS
server stores the same instance again). So a second run adds nothing, and a stopped run resumes where it was. One
log line per instance, naming it as the server does (Orthanc's ID; the SOP Instance UID over DICOMweb).

Credentials come from the environment (`credentials_from_env`: BONE_R_PACS_USER, BONE_R_PACS_PASSWORD) and are
never logged. Imports nothing else of the project but `bone_r.dicom_results`.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
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


class StoreFailed(Exception):  # noqa: N818 - one instance's results were refused or misfiled; the run goes on
    """The server did not take one instance's results where they belong: that instance failed, with `str(reason)`."""


def credentials_from_env(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) from BONE_R_PACS_USER / BONE_R_PACS_PASSWORD, or None when no user is set."""
    environ = os.environ if environ is None else environ
    user = environ.get(USER_ENV, "")
    return (user, environ.get(PASSWORD_ENV, "")) if user else None


def _session(url: str, what: str, auth: tuple[str, str] | None) -> Any:
    """A requests session for `url` (checked: http(s), no credentials in it) that uses `auth` and nothing else."""
    import requests

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"the URL must be an http(s) URL of {what}, got {url!r}")
    if parts.username or parts.password:
        raise PacsError(f"put the credentials in {USER_ENV} and {PASSWORD_ENV}, not in the URL")
    session = requests.Session()
    session.auth = auth
    session.trust_env = False  # no proxy or .netrc credentials from elsewhere
    return session


def _refused(server: str, url: str) -> PacsError:
    return PacsError(f"{server} at {url} refused the credentials (HTTP 401); set {USER_ENV} and {PASSWORD_ENV}")


@dataclass(frozen=True)
class Series:
    """A series as the worker sees it. `key` names it in the log and in `Counts.seen` (the server's own ID for
    Orthanc, the SeriesInstanceUID over DICOMweb); `ref` is what its store needs to list its instances."""

    key: str
    modality: str
    description: str
    instances: int
    ref: Any = None


@dataclass(frozen=True)
class Instance:
    """An instance of a radiograph series: `key` names it in the log; `study_uid` and `sop_uid` name its results
    (`dicom_results.result_uids`); `ref` is what its store needs to fetch it and to store beside it."""

    key: str
    study_uid: str
    sop_uid: str
    ref: Any = None


class Store(Protocol):
    """What the worker needs of a PACS; `Orthanc` and `DicomWeb` are the two there are."""

    url: str

    def describe(self) -> str:
        """What the server is, for the first line of a run; raises PacsError when it cannot be used."""

    def list_series(self) -> Iterator[Series]:
        """Every series on the server (a page at a time)."""

    def list_instances(self, series: Series) -> Iterator[Instance]:
        """The instances of a series."""

    def has_instance(self, instance: Instance, sop_uid: str) -> bool:
        """Whether an instance with `sop_uid` is stored (in `instance`'s study)."""

    def fetch(self, instance: Instance) -> bytes:
        """The instance as a DICOM file."""

    def store_results(self, instance: Instance, datasets: Sequence[Any]) -> list[str]:
        """Store `datasets` (in order) in `instance`'s study; their names as the server gives them. Raises
        StoreFailed when they were refused or landed elsewhere."""


class Orthanc:
    """The few calls of Orthanc's REST API the worker makes, and the `Store` interface on top of them."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, timeout_s: float = 60.0):
        self.session = _session(url, "an Orthanc server", auth)
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._study_uids: dict[str, str] = {}  # Orthanc's study ID -> StudyInstanceUID

    def __repr__(self) -> str:  # never the credentials
        return f"Orthanc({self.url!r})"

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        import requests

        try:
            response = self.session.request(method, f"{self.url}{path}", timeout=self.timeout_s, **kw)
        except requests.RequestException as err:
            raise PacsError(f"cannot reach Orthanc at {self.url} ({type(err).__name__})") from None
        if response.status_code == 401:
            raise _refused("Orthanc", self.url)
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

    # the Store interface

    def describe(self) -> str:
        return f"Orthanc {self.system().get('Version', '?')} at {self.url}"

    def list_series(self) -> Iterator[Series]:
        for series in self.series():
            tags = series.get("MainDicomTags", {})
            yield Series(series["ID"], str(tags.get("Modality", "")).strip().upper(), tags.get("SeriesDescription", ""),
                         len(series.get("Instances", [])), ref=series)

    def list_instances(self, series: Series) -> Iterator[Instance]:
        study = series.ref["ParentStudy"]
        if study not in self._study_uids:
            self._study_uids[study] = self.get_json(f"/studies/{study}")["MainDicomTags"].get("StudyInstanceUID", "")
        for instance in self.instances(series.key):
            yield Instance(instance["ID"], self._study_uids[study],
                           instance.get("MainDicomTags", {}).get("SOPInstanceUID", ""), ref=study)

    def has_instance(self, instance: Instance, sop_uid: str) -> bool:
        return bool(self.lookup(sop_uid))

    def fetch(self, instance: Instance) -> bytes:
        return self.get_file(instance.key)

    def store_results(self, instance: Instance, datasets: Sequence[Any]) -> list[str]:
        stored = [self.store(dicom_results.to_bytes(ds)) for ds in datasets]
        wrong = [s.get("ParentStudy") for s in stored if s.get("ParentStudy") != instance.ref]
        if wrong:
            raise StoreFailed(f"a result landed in study {wrong[0]}, not {instance.ref}")
        return [str(s.get("ID")) for s in stored]


def _tag(item: dict[str, Any], keyword: str) -> str:
    """The first value of `keyword` in a DICOM JSON dataset (a QIDO-RS answer), or ""."""
    from pydicom.datadict import tag_for_keyword

    values = item.get(f"{tag_for_keyword(keyword):08X}", {}).get("Value") or [""]
    return str(values[0])


class DicomWeb:
    """Any DICOMweb server (e.g. Orthanc's plugin at http://HOST:8042/dicom-web), through `dicomweb-client`:
    QIDO-RS lists and looks up, WADO-RS fetches (in the stored transfer syntax), STOW-RS stores into the study."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, timeout_s: float = 60.0, page: int = 100):
        try:
            from dicomweb_client import DICOMwebClient
        except ImportError:  # pragma: no cover - a requirement
            raise PacsError("DICOMweb needs the dicomweb-client package (pip install -r requirements.txt)") from None
        session = _session(url, "a DICOMweb service", auth)
        self.url = url.rstrip("/")
        self.page = page
        try:
            self.client = DICOMwebClient(self.url, session=session, timeout=timeout_s)
        except ValueError as err:
            raise PacsError(f"not a DICOMweb URL: {err}") from None
        self.client.set_http_retry_params(retry=False)  # a server that is down is `watch`'s business

    def __repr__(self) -> str:  # never the credentials
        return f"DicomWeb({self.url!r})"

    def _call(self, what: str, method: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """`self.client.method(...)`, its failures as PacsError (which stops the run) or StoreFailed (a STOW-RS
        that refused these instances: 409)."""
        import requests

        try:
            return method(*args, **kw)
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            if status == 401:
                raise _refused("the DICOMweb service", self.url) from None
            if status == 409 and what == "STOW-RS":
                raise StoreFailed(f"the server refused the results (STOW-RS, HTTP 409): {err.response.text[:200]}") from None
            text = err.response.text[:200] if err.response is not None else ""
            raise PacsError(f"the DICOMweb service at {self.url} answered HTTP {status} to {what}: {text}") from None
        except requests.RequestException as err:
            raise PacsError(f"cannot reach the DICOMweb service at {self.url} ({type(err).__name__})") from None

    def _search(self, what: str, method: Callable[..., list[dict[str, Any]]], *args: Any, **kw: Any) -> Iterator[dict[str, Any]]:
        """A QIDO-RS search, a page at a time, until the server has no more."""
        offset = 0
        while True:
            batch = self._call(what, method, *args, limit=self.page, offset=offset, **kw)
            if not batch:
                return
            yield from batch
            offset += len(batch)

    # the Store interface

    def describe(self) -> str:
        self._call("QIDO-RS", self.client.search_for_studies, limit=1)  # reachable, and the credentials taken
        return f"DICOMweb service at {self.url}"

    def list_series(self) -> Iterator[Series]:
        for item in self._search("QIDO-RS", self.client.search_for_series, fields=["SeriesDescription"]):
            count = _tag(item, "NumberOfSeriesRelatedInstances")
            yield Series(_tag(item, "SeriesInstanceUID"), _tag(item, "Modality").strip().upper(),
                         _tag(item, "SeriesDescription"), int(count) if count.isdigit() else 0,
                         ref=_tag(item, "StudyInstanceUID"))

    def list_instances(self, series: Series) -> Iterator[Instance]:
        for item in self._search("QIDO-RS", self.client.search_for_instances, series.ref, series.key):
            yield Instance(_tag(item, "SOPInstanceUID"), series.ref, _tag(item, "SOPInstanceUID"), ref=series.key)

    def has_instance(self, instance: Instance, sop_uid: str) -> bool:
        return bool(self._call("QIDO-RS", self.client.search_for_instances, instance.study_uid,
                               search_filters={"SOPInstanceUID": sop_uid}, limit=1))

    def fetch(self, instance: Instance) -> bytes:
        dataset = self._call("WADO-RS", self.client.retrieve_instance, instance.study_uid, instance.ref, instance.sop_uid)
        return dicom_results.to_bytes(dataset)  # the file as stored: its transfer syntax and pixel data unchanged

    def store_results(self, instance: Instance, datasets: Sequence[Any]) -> list[str]:
        import pydicom

        files = [pydicom.dcmread(io.BytesIO(dicom_results.to_bytes(ds))) for ds in datasets]  # Part 10, with meta
        answer = self._call("STOW-RS", self.client.store_instances, files, instance.study_uid)
        failed = answer.get("FailedSOPSequence") or []
        stored = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence") or []}
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        if failed or not set(uids) <= stored:
            reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: failure reason "
                                f"{item.get('FailureReason', '?')}" for item in failed)
            raise StoreFailed(f"STOW-RS did not store every result in study {instance.study_uid} ({reasons or 'not listed'})")
        return uids


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


def run_once(server: Store, analyse: Analyse, identity: dict[str, Any],
             modalities: tuple[str, ...] = RADIOGRAPH_MODALITIES, counts: Counts | None = None) -> Counts:
    """One pass over the server (an `Orthanc` or a `DicomWeb`). `identity` is what names a result before it
    exists: ``model`` ({"name", "version"}), ``mode`` and ``threshold`` (see `dicom_results.result_uids`).
    `counts` carries over between passes (`watch`): instances and series it has seen are not looked at again."""
    counts = counts if counts is not None else Counts()
    for series in server.list_series():
        if series.key in counts.seen:
            continue
        if series.modality not in modalities:
            counts.seen.add(series.key)
            if series.description not in OWN_SERIES:
                counts.skipped += 1
                log.info("skipped series %s (%s, %d instance(s)): modality %s is not a radiograph (%s)", series.key,
                         series.description or "no description", series.instances, series.modality or "missing",
                         "/".join(modalities))
            continue
        for instance in server.list_instances(series):
            if instance.key not in counts.seen:
                _handle(server, analyse, identity, series.modality, instance, counts)
    return counts


def _handle(server: Store, analyse: Analyse, identity: dict[str, Any], modality: str, instance: Instance,
            counts: Counts) -> None:
    where = f"instance {instance.key} ({modality})"
    uids = dicom_results.result_uids(instance.study_uid, instance.sop_uid, identity)
    if server.has_instance(instance, uids.sr):
        counts.done += 1
        counts.seen.add(instance.key)
        log.info("done    %s: its Bone-R result is already stored", where)
        return
    t0 = time.perf_counter()
    try:
        data = server.fetch(instance)
        record, display = analyse(data)
        source = dicom_results.read_header(data)
        if str(source.get("StudyInstanceUID", "")) != instance.study_uid or str(source.get("SOPInstanceUID", "")) != instance.sop_uid:
            raise Skip("its file's UIDs differ from what the server indexed")
        results = dicom_results.build_results(source, record, display)
    except (Skip, ValueError) as err:  # ValueError: the source lacks what a result needs (dicom_results says what)
        counts.skipped += 1
        counts.seen.add(instance.key)
        log.info("skipped %s: %s", where, err)
        return
    except PacsError:
        raise
    except Exception as err:  # noqa: BLE001 - one odd file must not stop the others; the run exits 1
        counts.failed += 1
        log.exception("failed  %s: its results could not be made (%s: %s)", where, type(err).__name__, err)
        return
    try:
        stored = server.store_results(instance, results)  # the overlay, then the SR: see above
    except StoreFailed as err:
        counts.failed += 1
        log.error("failed  %s: %s", where, err)
        return
    counts.stored += 1
    counts.seen.add(instance.key)
    found = sum(1 for d in record.get("detections", []) if d["score"] >= record["threshold"])
    verdict = f"fracture suspected ({found} box(es))" if found else "no finding above threshold"
    log.info("stored  %s: %s, %s mode; overlay %s, SR %s (%.1f s)", where, verdict, record.get("mode"),
             stored[0], stored[1], time.perf_counter() - t0)


def watch(server: Store, analyse: Analyse, identity: dict[str, Any], interval_s: float = 30.0,
          modalities: tuple[str, ...] = RADIOGRAPH_MODALITIES, passes: int | None = None) -> Counts:
    """`run_once` every `interval_s` until interrupted (or `passes` passes); a server that is down for a while is
    waited for (logged), not fatal."""
    counts = Counts()
    n = 0
    while passes is None or n < passes:
        n += 1
        try:
            run_once(server, analyse, identity, modalities, counts)
        except PacsError as err:
            log.warning("pass %d: %s; trying again in %g s", n, err, interval_s)
        if passes is None or n < passes:
            time.sleep(interval_s)
    return counts
