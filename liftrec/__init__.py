"""liftrec."""
