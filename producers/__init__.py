"""Front doors that turn catalogue rows, CMS events and ops requests into jobs."""
