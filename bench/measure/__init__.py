"""Measuring: alternated timing, machine facts and memory, agreement checks, end-to-end runs, fresh worker processes."""
