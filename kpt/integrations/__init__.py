"""Integrations with model libraries; import the one you need, e.g. ``kpt.integrations.hf``."""
