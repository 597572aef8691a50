"""Task data: SuperNI / Long Sequence files, prompt templates, encoding, the demo data."""
