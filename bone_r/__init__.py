"""Bone-R's library: the logic every script uses, once. Imports nothing else of the project.

Modules: `image` (decode, DICOM), `contract` (harmonize, the long-side resize, box scaling), `detection`
(Detection, Prediction, records), `card` (the typed model card, its one writer and resolver), `modes` (operating
modes), `dataset` (labels, splits.csv, ground truth), `metrics`, `report` (report text, tables and plots), `preprocess`
(harmonizing a tree offline), `draw`, `site`, `runs` (run folders, seeds, threads, hashes), `distributed` (torchrun ranks for the torchvision trainer), `fusion`, `synthetic` (phantoms for tests and demos),
`dicom_results` (a prediction as DICOM: an SR and an annotated Secondary Capture in the source's study), `pacs` (the
PACS worker that stores them).

Research and teaching tool, not a diagnosis.
"""

DISCLAIMER = (
    "Bone-R is a research and teaching tool, not a medical device and not a diagnosis. "
    "A clinician must read every radiograph."
)
