"""Code both sides of meterai use: configuration, database, order life cycle, stamping, payments, storage."""
