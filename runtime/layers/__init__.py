"""Reusable model layers (tensor-parallel aware; at tp_size 1 every collective is a no-op)."""
