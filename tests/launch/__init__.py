"""Launcher tests: real Slurm and Ray clusters on 127.0.0.1."""
