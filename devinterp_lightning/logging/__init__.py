"""Sinks: turn series and transitions into logger calls, TensorBoard text, images and layouts."""
