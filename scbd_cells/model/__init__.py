"""Model stage: encoders, the SCBD module and its losses."""
