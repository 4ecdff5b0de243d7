"""The provenance store: SQLAlchemy tables, the one writer, read-side reports."""
