"""Torch-only core: plans, mesh math, schedules, formulas, tables. Nothing here imports lightning."""
