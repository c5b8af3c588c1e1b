"""Bone-R's library: the logic every script uses, once. Imports nothing else of the project.

Modules so far: `draw` (boxes, labels, legend and disclaimer band on a radiograph),
`site` (the docs site's data files and their bundle for pages opened from disk).

Research and teaching tool, not a diagnosis.
"""
