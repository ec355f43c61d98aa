"""Generated code of the building blocks protos; see scripts/gen_protos.py."""
