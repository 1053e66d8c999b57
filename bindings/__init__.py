"""Python classes generated from yang/ by pyangbind (`make bindings`).

Generated, never edited by hand: tests/test_bindings.py regenerates them and fails
on any difference.
"""
