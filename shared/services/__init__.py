"""What happens to an order, one module per step: checkout, payments, stamping, refunds, housekeeping.

Celery tasks and CLI commands are thin wrappers around these functions, so each step can be read (and
tested) without the queue in the way. Every function here is idempotent: it re-reads the order and acts
only if the row is still in the state it expects.
"""
