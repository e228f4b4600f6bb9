"""Pure functions that turn ``rd`` results into pictures and figures (unit-tested directly)."""
