"""Mapping between the controller's optical model and ONF Transport API objects."""
