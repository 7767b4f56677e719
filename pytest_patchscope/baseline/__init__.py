"""Baselines of localization profiles, split as in syrupy: the file format (serializer), keys,
storage (locked, atomic merge-writes), comparison (comparator) and rendering for people.

Nothing here imports pytest; the gate (``gate.py``) calls these.
"""
