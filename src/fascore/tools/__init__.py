"""fascore user tools: capture (replay bundles) and compare (NPU runs against the exact reference)."""
