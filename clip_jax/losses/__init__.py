"""Losses, written on globally sharded arrays (GSPMD places the collectives)."""
