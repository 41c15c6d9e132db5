"""Test harnesses shipped with the library (fault injection); the product never imports this."""
