"""pab-build: build the PAB benchmark (text-based person anomaly search) and train/evaluate CMP."""

__version__ = "0.1.0"
