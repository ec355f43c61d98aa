"""The config building block: a JSON tree per namespace, with secret leaves."""
