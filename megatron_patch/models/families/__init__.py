"""The model families: one module each, imported (and so registered) by ``models.family`` on first use."""
