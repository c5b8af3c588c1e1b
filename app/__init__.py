"""Bone-R's FastAPI service (`app.main:app`)."""
