"""YANG modules of sdqkd, shipped as package data (see sdqkd.yangmodels)."""
