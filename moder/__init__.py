"""MoDER: per-class textual experts on a frozen CLIP, a hub, and composed prototypes for unseen classes."""

__version__ = "0.1.0"
