"""Controlled pretraining experiments: place token sequences at chosen positions of the training stream.

interval_set: IntervalSet, disjoint int64 intervals (treap; Python and C++ backends) for collision-free placement.
"""

from nanolab.insertion.interval_set import IntervalSet, cpp_available

__all__ = ["IntervalSet", "cpp_available"]
