"""QEMU: its command line, its QMP monitor, its device state, and restores into a new QEMU."""
