"""The stage table, one unit of work per stage, plan, estimates and report: over the store, without Ray."""
