"""Analyse the radiographs of a PACS and store Bone-R's results (an SR and an annotated image) in their studies.

    python scripts/pacs.py --url http://127.0.0.1:8042 --once      # every CR/DX/DR instance without a result yet
    python scripts/pacs.py --url http://127.0.0.1:8042 --watch     # the same every --interval seconds, until Ctrl-C
    python scripts/pacs.py --dicomweb http://127.0.0.1:8042/dicom-web --once   # any DICOMweb server instead

--url talks to Orthanc's REST API; --dicomweb to any server that speaks DICOMweb (QIDO-RS, WADO-RS, STOW-RS; Orthanc
with its DICOMweb plugin, among others). Both find and store the same results, so either sees what the other did.

Credentials, when the server asks for them, come from BONE_R_PACS_USER and BONE_R_PACS_PASSWORD (never the command
line, never printed). Idempotent: an instance whose result (same model, mode and threshold) is stored is left alone,
so a second run adds nothing and a stopped run resumes. One log line per instance; other modalities and files that
cannot be decoded are skipped with the reason. The work is `bone_r.pacs` and `bone_r.dicom_results`; the model is
`inference.Predictor` (the bundled model unless --weights).

Research and teaching tool, not a diagnosis.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import inference
from bone_r import DISCLAIMER, dicom_results, pacs
from bone_r.contract import to_uint8
from bone_r.image import DEFAULT_MAX_MEMORY, OVERLAY_BYTES_PER_PIXEL, ImageDecodeError, load_image
from bone_r.modes import MODES


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"credentials: {pacs.USER_ENV}, {pacs.PASSWORD_ENV}. " + DISCLAIMER)
    server = p.add_mutually_exclusive_group(required=True)
    server.add_argument("--url", help="Orthanc's REST API, e.g. http://127.0.0.1:8042")
    server.add_argument("--dicomweb", metavar="URL",
                        help="a DICOMweb service's root (QIDO-RS, WADO-RS, STOW-RS), e.g. http://127.0.0.1:8042/dicom-web")
    run = p.add_mutually_exclusive_group(required=True)
    run.add_argument("--once", action="store_true", help="one pass over the server, then exit")
    run.add_argument("--watch", action="store_true", help="a pass every --interval seconds until interrupted")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between passes with --watch (default 30)")
    p.add_argument("--mode", default="balanced", choices=MODES, help="operating point (model card thresholds)")
    p.add_argument("--conf", type=float, default=None, help="score threshold in [0, 1], overriding --mode")
    p.add_argument("--weights", type=Path, default=None, help="model weights (default: the bundled model)")
    p.add_argument("--backend", default=None, help="detector backend (default: from the model card or file type)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modalities", default=",".join(pacs.RADIOGRAPH_MODALITIES),
                   help="series modalities to analyse, comma-separated (default CR,DX,DR)")
    p.add_argument("--max-memory-mb", type=float, default=DEFAULT_MAX_MEMORY / 1e6,
                   help="skip images whose decode (and overlay) would need more memory, estimated from the header")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for one request to the server")
    return p


def make_analyse(predictor: inference.Predictor, mode: str, conf: float | None, identity: dict, max_memory: int):
    """analyse(data) -> (record, display) for `bone_r.pacs`: decode with the contract's rules, predict, and say why not."""
    def analyse(data: bytes):
        try:
            loaded = load_image(data, max_pixels=predictor.max_pixels, max_memory=max_memory,
                                extra_bytes_per_pixel=OVERLAY_BYTES_PER_PIXEL, contract=predictor.contract)
        except ImageDecodeError as err:
            raise pacs.Skip(f"undecodable ({err})") from None
        if loaded.meta.format != "dicom":
            raise pacs.Skip(f"not a DICOM file ({loaded.meta.format})")
        prediction = predictor.predict_loaded(loaded, "", mode, conf)
        record = prediction.to_record() | identity
        return record, to_uint8(loaded.pixels, predictor.contract)
    return analyse


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("boner").setLevel(logging.INFO)  # our lines; highdicom's own INFO chatter stays out
    if args.conf is not None and not 0 <= args.conf <= 1:
        print(f"error: --conf must lie in [0, 1], got {args.conf}", file=sys.stderr)
        return 2
    modalities = tuple(m.strip().upper() for m in args.modalities.split(",") if m.strip())
    try:
        kind = pacs.Orthanc if args.url else pacs.DicomWeb
        server = kind(args.url or args.dicomweb, pacs.credentials_from_env(), args.timeout)
        where = server.describe()
        predictor = inference.Predictor(args.weights, args.backend, args.device)
        threshold, _ = predictor.threshold(args.mode, args.conf)
    except (pacs.PacsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    identity = {"model": dicom_results.model_identity(predictor.card, predictor.weights, predictor.name),
                "mode": args.mode, "threshold": threshold, "disclaimer": DISCLAIMER}
    analyse = make_analyse(predictor, args.mode, args.conf, identity, int(args.max_memory_mb * 1e6))
    print(f"{where}; model {identity['model']['name']} ({identity['model']['version']}), "
          f"{args.mode} mode, threshold {threshold:.3f}; analysing {'/'.join(modalities)}", flush=True)
    try:
        if args.watch:
            counts = pacs.watch(server, analyse, identity, args.interval, modalities)
        else:
            counts = pacs.run_once(server, analyse, identity, modalities)
    except KeyboardInterrupt:
        print("stopped; run again to go on where it stopped")
        return 130
    except pacs.PacsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{counts}. {DISCLAIMER}")
    return 1 if counts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
