"""Development, test and demo tooling; production code never imports it."""
