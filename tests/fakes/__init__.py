"""Local stand-ins for hosted platforms (no hosted platform is reachable from the tests)."""
