"""Commands that are no DVC stage and belong to no other part: export, ruler, sync."""
