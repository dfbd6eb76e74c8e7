"""Realtime change streams: capture triggers, a change log, filtered
subscriptions with durable cursors, and execution output streams."""
