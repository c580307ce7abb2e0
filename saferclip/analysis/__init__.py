"""Analysis of CLIP models beyond evaluation (filled in below)."""
