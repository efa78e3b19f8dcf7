"""Model stages of the example declared by configuration (``defs.yaml``), one folder each."""
