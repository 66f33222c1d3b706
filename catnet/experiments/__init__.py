"""The paper's experiments: Tables 1-2 variants, cached stages, the demo, reproduce, the report figures."""
