"""Labelled data for the tasks: readers of packaged files and Hugging Face datasets (sources.py),
fixed splits and seeded batch order (batching.py)."""
