"""What loads or wraps a model: the load-once cache and load gate, OpenPose, ResNet-50, Qwen2-VL and the captioning and attribute steps built on it."""
