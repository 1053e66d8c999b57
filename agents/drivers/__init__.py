"""Device drivers of an SD-QKD node: emulated QKD modules, optical switches, and the
lab's emulated optical plant they share. The agent picks a class by kind (registry.py)
and talks to it only through the five-method interface in base.py."""
