"""The fault proxy: Toxiproxy's HTTP API and toxics, on trio."""
