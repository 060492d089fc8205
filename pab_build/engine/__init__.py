"""The build engine: units and their markers, the stage order, preflight, locks, status and progress, GPU worker pools."""
