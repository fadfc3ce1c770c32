"""Tensor-parallel plans: resolution, the style vocabulary, custom styles, matching, validation, application."""
