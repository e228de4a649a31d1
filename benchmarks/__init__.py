"""Scripts that measure speed, memory, parity error and sample quality; each prints a table and writes JSON."""
