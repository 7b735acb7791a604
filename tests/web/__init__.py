"""Browser tests of the web page (kodkod.web)."""
