"""bitdet hardware: Amaranth components of the accelerator."""
