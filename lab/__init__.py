"""Emulated QKD networks from sdqkd-lab topology files."""
