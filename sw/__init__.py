"""bitdet host software: golden model, packing, folding, bundle, driver, CLI."""
