"""CMP, the Cross-Modal Pose-aware retrieval model (paper sections 4-5): model, losses, data,
training, evaluation and metrics. Heavy imports stay inside the submodules."""

__all__ = ["data", "evaluate", "losses", "metrics", "model", "official", "train"]
