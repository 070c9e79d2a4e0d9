"""Many runs at once: Ray Tune searches (tune.py) and equal-budget optimizer comparisons (compare.py)."""
