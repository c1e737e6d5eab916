"""Building blocks shared by every tower and head."""
