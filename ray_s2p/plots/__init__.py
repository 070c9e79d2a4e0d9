"""Figures: learning curves of run directories (curves.py) and comparison curves over seeds (comparison.py)."""
