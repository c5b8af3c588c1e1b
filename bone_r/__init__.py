"""Bone-R's library: the logic every script uses, once. Imports nothing else of the project.

Modules so far: `draw` (boxes, labels, legend and disclaimer band on a radiograph),
`site` (the docs site's data files and their bundle for pages opened from disk), `dicom_results` (a prediction
as DICOM: an SR and an annotated Secondary Capture in the source's study), `pacs` (the Orthanc worker that stores them).

Research and teaching tool, not a diagnosis.
"""
