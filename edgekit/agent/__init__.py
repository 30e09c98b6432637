"""On-device side of edgekit. Imports without torch: devices may not have it."""
