"""Teachers: the TeacherModule (forward -> sparse distributions), identity and vocabulary checks,
per-teacher template alignment, and collection into the cache."""
