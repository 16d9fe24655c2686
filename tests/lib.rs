//! End-to-end scenarios live in `scenarios/`; see `docs/testing.md`.
