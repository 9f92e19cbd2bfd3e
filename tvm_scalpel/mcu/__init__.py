"""Microcontroller (Cortex-M4) projects: the firmware runner that runs a generated C project
under qemu-system-arm and counts the instructions of its model call (firmware.py, reading the
project's model.json with manifest.py)."""
