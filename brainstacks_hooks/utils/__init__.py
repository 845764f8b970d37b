"""Small shared utilities (I/O, logging, seeding, optional imports)."""
