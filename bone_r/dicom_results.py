"""DICOM results of a prediction on a DICOM radiograph: a structured report and an annotated image a PACS can show.

`build_results(source, record, display)` turns one prediction into two DICOM instances of the source's study,
built with highdicom (SOP classes, UIDs and references as the standard has them):

- a Comprehensive 3D SR holding a TID 1500 Measurement Report: an image-level group (fracture suspected: yes/no,
  the top score, the mode and threshold, a sentence saying what was found, "no finding above threshold" when
  nothing was) and one TID 1410 planar ROI group per box, its region a closed POLYLINE (SCOORD) in the source
  image's own pixels, referencing the source SOP instance, with the score, the model's name and version (TID 4019
  algorithm identification) and the best-guess type/severity hints marked as best guesses; every group and the
  report carry the disclaimer;
- a Secondary Capture of the source with the boxes burned in (the one drawing code, `bone_r.draw`), which even the
  simplest viewer shows.

Each goes into a series of its own (one SR series and one overlay series per study and model), whose description
says it is machine-generated and not a diagnosis. Every UID is derived from the source instance's UID, the model's
name and version, the mode and the threshold, so building again gives the same objects: a PACS that already holds
them does not get a second copy, and a worker knows an instance is done when its SR UID is known (`result_uids`).

`record` is a prediction as plain data: `Prediction.to_record()` or the `/detect` JSON, i.e. ``detections`` (each
``xyxy`` in original-image pixels, ``score``, ``label``, ``model``, optional ``hints``), ``mode``, ``threshold``,
``image_size``, plus ``model`` ({"name", "version"}, see `model_identity`) and ``disclaimer``. Imports nothing else
of the project but `bone_r.draw`.

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bone_r.card import ModelCard

MANUFACTURER = "Bone-R (research software)"
SR_SERIES_DESCRIPTION = "Bone-R SR: machine-generated, not a diagnosis"
OVERLAY_SERIES_DESCRIPTION = "Bone-R overlay: machine-generated, not a diagnosis"
SR_SERIES_NUMBER = 9901
OVERLAY_SERIES_NUMBER = 9902
DEFAULT_DISCLAIMER = "Bone-R is a research and teaching tool, not a medical device and not a diagnosis."
# Bone-R's own concepts (a private coding scheme: designators starting with 99 are the standard's local ones)
SCHEME = "99BONER"


def _codes() -> SimpleNamespace:
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    return SimpleNamespace(
        fracture=Code("72704001", "SCT", "Fracture"),
        radiography=Code("363680008", "SCT", "Radiographic imaging procedure"),
        yes=codes.SCT.Yes,
        no=codes.SCT.No,
        no_units=codes.UCUM.NoUnits,
        suspected=Code("suspected", SCHEME, "Fracture suspected above threshold"),
        score=Code("score", SCHEME, "Detector score"),
        top_score=Code("top-score", SCHEME, "Highest detector score"),
        threshold=Code("threshold", SCHEME, "Score threshold"),
        mode=Code("mode", SCHEME, "Operating mode"),
        summary=Code("summary", SCHEME, "Summary"),
        type_hint=Code("type-hint", SCHEME, "Fracture type (best guess, not a diagnosis)"),
        severity_hint=Code("severity-hint", SCHEME, "Severity (best guess, not a diagnosis)"),
        hint_note=Code("hint-note", SCHEME, "About the best guesses"),
        disclaimer=Code("disclaimer", SCHEME, "Disclaimer"),
    )


def model_identity(card: ModelCard | None, weights: str | Path | None, detector: str = "") -> dict[str, str]:
    """The model's name and version as the results name it: the card's name (else the weights' stem, else the
    detector's name) and ``sha256:<first 12 hex digits>`` of the weights file (else the card's version, else
    "unknown"): a retrained model is another version even when its name stays."""
    card = card or ModelCard()
    name = str(card.name or (Path(weights).stem if weights else "") or detector or "model")
    version = str(card.extra.get("version") or "unknown")
    if weights and Path(weights).is_file():
        digest = hashlib.sha256()
        with open(weights, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        version = f"sha256:{digest.hexdigest()[:12]}"
    return {"name": name, "version": version}


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of the results of one source instance, for one model, mode and threshold."""

    sr_series: str
    overlay_series: str
    sr: str
    overlay: str


def _model(record: dict[str, Any]) -> tuple[str, str]:
    model = record.get("model") or {}
    name = str(model.get("name") or model.get("detector") or model.get("weights") or "model")
    return name, str(model.get("version") or model.get("sha256_prefix") or "unknown")


def result_uids(study_uid: str, source_uid: str, record: dict[str, Any]) -> ResultUIDs:
    """Deterministic UIDs (2.25 UUID form) of the results of `source_uid`: same input, same UIDs."""
    name, version = _model(record)
    model = ["bone-r", name, version]
    run = [*model, str(record.get("mode", "")), f"{float(record.get('threshold', 0.0)):.6f}"]

    return ResultUIDs(
        sr_series=uid(*model, "sr-series", study_uid),
        overlay_series=uid(*model, "overlay-series", study_uid),
        sr=uid(*run, "sr", source_uid),
        overlay=uid(*run, "overlay", source_uid),
    )


def uid(*parts: str) -> str:
    """A UID derived from `parts` alone: 2.25 and a name-based UUID (version 5), as PS3.5 B.2 allows."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, chr(0).join(parts)).int}"


# Patient and study attributes the results copy; type 2 (present, possibly empty) in both SOP classes
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _require(source: Any, keywords: Sequence[str]) -> Any:
    """The source's header (no pixel data) with the type 2 patient and study attributes a modality may leave
    out present (empty); a ValueError naming the `keywords` it lacks."""
    from pydicom.dataset import Dataset

    missing = [k for k in keywords if not str(source.get(k, "") or "").strip()]
    if missing:
        raise ValueError(f"the source DICOM lacks {', '.join(missing)}: its results cannot be placed in its study")
    header = Dataset()
    for element in source:
        if element.keyword != "PixelData":
            header.add(element)
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _detections(record: dict[str, Any]) -> list[SimpleNamespace]:
    """The record's boxes as objects `bone_r.draw` draws, best first."""
    dets = []
    for d in record.get("detections") or []:
        x1, y1, x2, y2 = (float(v) for v in d["xyxy"])
        dets.append(SimpleNamespace(xyxy=(x1, y1, x2, y2), score=float(d["score"]), label=str(d.get("label") or "fracture"),
                                    model=str(d.get("model") or ""), hints=d.get("hints")))
    return sorted(dets, key=lambda d: d.score, reverse=True)


def summary_text(record: dict[str, Any]) -> str:
    """One sentence for a reader: what was found, at which operating point."""
    threshold, mode = float(record.get("threshold", 0.0)), str(record.get("mode", ""))
    found = [d for d in _detections(record) if d.score >= threshold]
    if not found:
        return (f"No finding above threshold: Bone-R found no fracture scoring at least {threshold:.3f} ({mode} mode). "
                "This does not rule out a fracture.")
    return (f"Bone-R suspects a fracture: {len(found)} region(s) scoring at least {threshold:.3f} ({mode} mode), "
            f"highest {found[0].score:.3f}. A clinician must read the radiograph.")


def build_sr(source: Any, record: dict[str, Any]) -> Any:
    """The Comprehensive 3D SR (TID 1500) of `record` on `source` (a pydicom Dataset; the header is enough)."""
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        DeviceObserverIdentifyingAttributes,
        ImageRegion,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        SourceImageForRegion,
        TextContentItem,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes as dcm_codes
    source = _require(source, ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"))
    c = _codes()
    uids = result_uids(str(source.StudyInstanceUID), str(source.SOPInstanceUID), record)
    name, version = _model(record)
    mode, threshold = str(record.get("mode", "")), float(record.get("threshold", 0.0))
    disclaimer = str(record.get("disclaimer") or DEFAULT_DISCLAIMER)
    dets = _detections(record)
    algorithm = AlgorithmIdentification(name=f"Bone-R {name}", version=version,
                                        parameters=[f"mode={mode}", f"threshold={threshold:.6f}"], manufacturer=MANUFACTURER)

    def text(concept: Any, value: str) -> Any:
        return TextContentItem(name=concept, value=value[:1024], relationship_type="CONTAINS")

    def number(concept: Any, value: float) -> Measurement:
        return Measurement(name=concept, value=round(float(value), 6), unit=c.no_units)  # the group names the algorithm

    found = [d for d in dets if d.score >= threshold]
    image_group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=uid(uids.sr, "image"),
                                               identifier="Bone-R image-level result"),
        finding_type=c.fracture,
        algorithm_id=algorithm,
        measurements=[*([number(c.top_score, dets[0].score)] if dets else []), number(c.threshold, threshold)],
        qualitative_evaluations=[QualitativeEvaluation(c.suspected, c.yes if found else c.no)],
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )
    image_group[0].ContentSequence.extend([text(c.mode, mode), text(c.summary, summary_text(record)),
                                           text(c.disclaimer, disclaimer)])
    groups = [image_group]
    for i, det in enumerate(dets, 1):
        x1, y1, x2, y2 = det.xyxy
        region = ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,  # a closed rectangle: first point repeated last
            graphic_data=np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64),
            source_image=SourceImageForRegion.from_source_image(source),
        )
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=uid(uids.sr, str(i)),
                                                   identifier=f"Bone-R finding {i}"),
            referenced_region=region,
            finding_type=c.fracture,
            algorithm_id=algorithm,
            measurements=[number(c.score, det.score)],
        )
        hints = det.hints or {}
        items = []
        if hints.get("type"):
            items.append(text(c.type_hint, str(hints["type"])))
        if hints.get("severity"):
            items.append(text(c.severity_hint, str(hints["severity"])))
        if hints:
            items.append(text(c.hint_note, str(hints.get("note") or "Best guesses from the box alone; not a diagnosis.")))
        items.append(text(c.disclaimer, disclaimer))
        group[0].ContentSequence.extend(items)
        groups.append(group)

    observer = ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=uid("bone-r", name, version),
            name="Bone-R", manufacturer_name=MANUFACTURER, model_name=f"{name} {version}"[:64]),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=c.radiography,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr,
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        series_description=SR_SERIES_DESCRIPTION,
        is_complete=True,
    )


def build_overlay(source: Any, record: dict[str, Any], display: np.ndarray) -> Any:
    """A Secondary Capture (RGB) of `display` (the source as shown: uint8 gray or RGB, in its own pixels) with
    the boxes, labels, key and disclaimer band of `bone_r.draw` burned in."""
    import highdicom as hd

    from bone_r import draw

    source = _require(source, ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"))
    uids = result_uids(str(source.StudyInstanceUID), str(source.SOPInstanceUID), record)
    name, _ = _model(record)
    dets = _detections(record)
    for det in dets:
        det.model = det.model or name
    gray = np.asarray(display)
    if gray.dtype != np.uint8:
        raise ValueError(f"the display image must be uint8, got {gray.dtype}")
    rgb = np.repeat(gray[:, :, None], 3, axis=2) if gray.ndim == 2 else gray
    title = f"{record.get('mode', '')} mode, threshold {float(record.get('threshold', 0.0)):.3f}"
    pixels = draw.draw_overlay(rgb, dets, title=title)
    orientation = tuple(str(v) for v in (source.get("PatientOrientation") or [])[:2])
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.overlay_series,
        series_number=OVERLAY_SERIES_NUMBER,
        sop_instance_uid=uids.overlay,
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # highdicom wants one; replaced by the source's (or empty, type 2) below
        series_description=OVERLAY_SERIES_DESCRIPTION,
    )
    sc.PatientOrientation = list(orientation) if len(orientation) == 2 and all(orientation) else ""
    sc.Modality = "OT"  # not a radiograph: nothing should take it for one (or analyse it again)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{summary_text(record)} {record.get('disclaimer') or DEFAULT_DISCLAIMER}"[:10240]
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [item]
    return sc


def build_results(source: Any, record: dict[str, Any], display: np.ndarray) -> list[Any]:
    """[annotated image, SR]: the overlay first, so that a result whose SR is stored is complete (see `bone_r.pacs`).

    highdicom's warnings about the source's own attributes (a person name of one component, say) are the
    source's business: they are not repeated for every result."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [build_overlay(source, record, display), build_sr(source, record)]


def to_bytes(dataset: Any) -> bytes:
    """A DICOM Part 10 file of `dataset`."""
    buf = io.BytesIO()
    dataset.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def describe(dataset: Any) -> str:
    """An SR's content tree as indented text (one line per content item), for logs, notes and tests."""
    lines: list[str] = []

    def value_of(item: Any) -> str:
        kind = item.ValueType
        if kind == "TEXT":
            return str(item.TextValue)
        if kind == "CODE":
            return str(item.ConceptCodeSequence[0].CodeMeaning)
        if kind == "NUM":
            measured = item.MeasuredValueSequence[0]
            return f"{measured.NumericValue} {measured.MeasurementUnitsCodeSequence[0].CodeValue}"
        if kind in ("UIDREF",):
            return str(item.UID)
        if kind == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            return f"{ref.ReferencedSOPClassUID.name} {ref.ReferencedSOPInstanceUID}"
        if kind == "SCOORD":
            data = [round(float(v), 2) for v in item.GraphicData]
            points = " ".join(f"({x:g}, {y:g})" for x, y in zip(data[::2], data[1::2]))
            ref = item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            return f"{item.GraphicType} {points} on {ref}"
        return ""

    def walk(items: Any, depth: int) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            text = value_of(item)
            lines.append(f"{'  ' * depth}{item.ValueType} {name}" + (f": {text}" if text else ""))
            if "ContentSequence" in item and item.ValueType != "SCOORD":
                walk(item.ContentSequence, depth + 1)

    title = dataset.ConceptNameCodeSequence[0].CodeMeaning
    lines.append(f"CONTAINER {title}")
    walk(dataset.ContentSequence, 1)
    return "\n".join(lines)


def read_header(data: bytes) -> Any:
    """The header of a DICOM file (no pixel data), for `build_results`."""
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
